"""Argument handling shared by every job: --config FILE, --set key=value, --overwrite."""
from __future__ import annotations

import argparse
import sys

from pipelines.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set spark.master=local[2] (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute even if the output is already committed")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "overwrite", False):
        overrides.append("output.overwrite=true")
    return load_config(args.config, overrides)


def run(main, argv=None) -> int:
    """Run a job's main, turning user errors into one clear line and exit code 2."""
    from schemas import SchemaError
    from pipelines.output import ConservationError, NotCommittedError
    try:
        return main(argv) or 0
    except (ConfigError, SchemaError, NotCommittedError, ConservationError, ValueError) as e:
        print(f"capfilt: error: {e}", file=sys.stderr)
        return 2
