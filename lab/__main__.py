import sys

from capfilt.lab.cli import main

sys.exit(main())
