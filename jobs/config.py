"""`capfilt config`: the effective configuration (defaults <- file <- --set), or every key documented."""
from __future__ import annotations

import argparse

import yaml

from jobs.common import add_config_args, config_from_args
from pipelines.config import describe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="capfilt config", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    args = parser.parse_args(argv)
    if args.keys:
        for key, default, help in describe():
            print(f"{key} = {default!r}\n    {help}")
        return 0
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    return 0
