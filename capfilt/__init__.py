"""capfilt: web-scale image-text curation (BLIP-style CapFilt) on Apache Spark.

One importable name. The code lives in the repository's top-level folders, which are capfilt's
subpackages:

    capfilt.schemas    schemas/     data contracts
    capfilt.pipelines  pipelines/   Spark stages
    capfilt.udfs       udfs/        per-row work: decode, models, hashing
    capfilt.net        net/         the download worker's web access: fetcher, address policy, robots.txt, politeness
    capfilt.jobs       jobs/        entry points: `capfilt <command>`, `spark-submit jobs/<stage>.py`
    capfilt.world      world/       the shapes world (synthetic corpus, loopback web server)
    capfilt.lab        lab/         training and evaluation of the small shapes-world models

How `capfilt.<sub>` finds its folder:

- installed (wheel or editable): pyproject.toml's [tool.setuptools] package-dir maps each
  capfilt.<sub> to <sub>/ (a wheel copies them under capfilt/; an editable install maps them);
  nothing but `capfilt` lands in site-packages;
- the `capfilt package` zip for spark-submit --py-files: members are capfilt/<sub>/...;
- a checkout that is not installed (its root on sys.path, e.g. `PYTHONPATH=. python ...`): the
  code below adds the repository root to this package's __path__, when the root holds
  pyproject.toml and every subpackage folder, so capfilt.<sub> is <root>/<sub>/.

Import from `capfilt.<sub>` only: a bare `pipelines` (etc.) is not installed.
"""
from pathlib import Path as _Path

_SUBPACKAGES = ("schemas", "pipelines", "udfs", "net", "jobs", "world", "lab")
_root = _Path(__file__).resolve().parent.parent
if (not (_Path(__file__).resolve().parent / "pipelines").is_dir() and (_root / "pyproject.toml").is_file()
        and all((_root / _name / "__init__.py").is_file() for _name in _SUBPACKAGES)):
    __path__.append(str(_root))  # noqa: F821 (a package's __path__)
del _Path, _root
