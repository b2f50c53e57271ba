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


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the previous stage's output directory")
    p.add_argument("--output", required=True, help="this stage's output directory")
    add_config_args(p)
    return p


def run_model_stage(args, stage: str, contract, transform, split, reasons: dict, models: dict) -> int:
    """Read a committed stage, run a model transform once (persisted), split into records and
    rejects, commit. Shared by caption and filter."""
    from pyspark import StorageLevel

    from pipelines.io import read_stage, write_stage
    from pipelines.output import StageOutput, build_manifest
    from pipelines.session import spark_session

    cfg = config_from_args(args)
    out = StageOutput(args.output, stage, overwrite=cfg.output.overwrite)
    if not out.begin():
        print(f"{args.output} is already committed: nothing to do (--overwrite to redo)")
        return 0
    spark = spark_session(cfg.spark)
    print(f"Spark UI: {spark.sparkContext.uiWebUrl}", flush=True)
    try:
        source = read_stage(spark, args.input, contract)
        n_input = source.count()
        # Persisted: splitting into records and rejects takes two passes; inference must run once.
        marked = transform(source, cfg).persist(StorageLevel.MEMORY_AND_DISK)
        data, rejects = split(marked, cfg)
        counts = write_stage(out, data, rejects, n_input, cfg.output.compression)
        marked.unpersist()
        out.commit(build_manifest(out, cfg.to_dict(), counts, models=models(cfg), reasons=reasons))
    except BaseException:
        out.abort()
        raise
    print(f"{args.output}: {counts.input} rows in, {counts.output} out, {counts.rejected_total} rejected "
          f"{counts.rejected.get(stage, {})}")
    return 0
