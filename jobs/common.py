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
    from pipelines.output import ConservationError, NotCommittedError, OutputInUse
    from udfs.models import ModelNotAvailable, UnsafeCheckpoint
    try:
        return main(argv) or 0
    except (ConfigError, SchemaError, NotCommittedError, ConservationError, ValueError, OutputInUse,
            ModelNotAvailable, UnsafeCheckpoint) as e:
        print(f"capfilt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncapfilt: interrupted: committed work is kept; rerun the same command to resume", file=sys.stderr)
        return 130


def reuse_committed(out, cfg: Config, stage: str, source: dict | None = None) -> bool:
    """True when `out` is committed and this run may take it as it is (nothing to do). One computed
    with other settings or from another input is refused rather than passed off as this run's."""
    from pipelines.output import read_manifest
    from pipelines.provenance import stale_reason
    if not out.complete or cfg.output.overwrite:
        return False
    why = stale_reason(read_manifest(out.root), cfg.to_dict(), stage, source)
    if why:
        raise ValueError(f"{out.root} is committed, but was made with {why} than this run's: pass --overwrite "
                         f"to recompute it, or choose another output")
    print(f"{out.root} is already committed: nothing to do (--overwrite to redo)")
    return True


def check_models(cfg: Config, stages) -> None:
    """Resolve every model reference the given stages will load, on the driver, before any work: a
    missing path or an unsafe checkpoint is one line now, not executor tracebacks hours later."""
    from udfs.models import check_reference
    if "caption" in stages and cfg.caption.num_captions:
        check_reference(cfg.caption.model, "captioner")
    if "filter" in stages:
        check_reference(cfg.filter.model, "clip")


def check_output_path(root: str, input: str | None = None, replaced: tuple[str, ...] = ("",)) -> None:
    """The output folder, or the nearest of its parents that exists, must be a folder, and the output
    must stay apart from the input: a commit replaces the `replaced` parts of the output whole (a stage
    its whole folder; curate OUT's stages/, curated/ and rejects/), and an input folder holding the
    output would read the output back as input on the next run."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(str(root))
    path = path.rstrip("/") or "/"
    while not fs.exists(path) and "/" in path.strip("/"):
        path = path.rsplit("/", 1)[0] or "/"
    if fs.exists(path) and not fs.isdir(path):
        raise ValueError(f"output {root}: {path} is a file, not a folder; choose another output")
    if input is None:
        return
    out, source = _location(root), _location(input)
    for part in replaced:
        target = out / part if part else out
        if source == target or target in source.parents:
            raise ValueError(f"the input {input} lies inside {target}, which this run replaces: choose another output")
    if source == out or source in out.parents:
        raise ValueError(f"the output {root} lies inside the input {input}: a rerun would read it back as input; "
                         f"choose another output")


def _location(path: str):
    """An absolute, comparable form of a local path or URL; a glob stands for the folder it searches."""
    import os
    from pathlib import PurePosixPath
    text = str(path)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "file", text
    parts = PurePosixPath(rest).parts
    cut = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    rest = str(PurePosixPath(*parts[:cut])) if cut else "."
    if scheme == "file":
        rest = os.path.realpath(os.path.expanduser(rest))
    return PurePosixPath(f"/{scheme}") / rest.lstrip("/")


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the previous stage's output directory")
    p.add_argument("--output", required=True, help="this stage's output directory")
    add_config_args(p)
    return p


def run_model_stage(args, stage: str, contract, transform, split, reasons: dict, models) -> int:
    """Read a committed stage, run a model transform over it part by part, split into records and
    rejects, commit. Shared by caption and filter.

    Phase 1 writes each part's model output (input files grouped to about `rows_per_part` rows)
    with a done-marker: a killed run, rerun with the same input and settings, skips finished parts.
    Phase 2 reads every part back and splits them together (the percentile cutoff stays global),
    so inference runs once per row without holding the output in memory."""
    import hashlib
    import json
    import time

    import fsspec

    from pipelines.io import write_stage
    from pipelines.output import OutputLock, StageOutput, build_manifest, read_manifest
    from pipelines.provenance import source_of
    from pipelines.session import spark_session

    cfg = config_from_args(args)
    settings = getattr(cfg, stage)
    check_output_path(args.output, args.input)
    source_manifest = read_manifest(args.input)  # refuses an uncommitted input
    out = StageOutput(args.output, stage, overwrite=cfg.output.overwrite)
    if reuse_committed(out, cfg, stage, source_of(source_manifest)):
        return 0
    check_models(cfg, [stage])
    with OutputLock(args.output):
        parts = input_parts(f"{str(args.input).rstrip('/')}/data", settings.rows_per_part)
        fingerprint = hashlib.sha256(json.dumps([source_manifest.get("finished_at"), parts, settings.__dict__,
                                                 cfg.seed], sort_keys=True, default=str).encode()).hexdigest()
        out.begin(resume=True, force=True)
        fs = fsspec.core.url_to_fs(out.path(""))[0]
        marker = out.path("work/fingerprint").split("://")[-1]
        if fs.exists(marker) and fs.cat(marker).decode() != fingerprint:
            print("The unfinished run at this output used other input or settings: starting over.")
            out.begin(resume=False, force=True)
        fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(marker, fingerprint.encode())
        spark = spark_session(cfg.spark)
        print(f"Spark UI: {spark.sparkContext.uiWebUrl}", flush=True)
        n_input, reused, started = sum(rows for _, rows in parts), 0, time.time()
        done_rows = 0
        for i, (files, rows) in enumerate(parts):
            part_dir = out.path(f"work/part-{i:05d}")
            if fs.exists(part_dir.split("://")[-1] + "/_SUCCESS"):  # Spark writes it last
                reused += 1
            else:
                source = spark.read.parquet(*files)
                contract.validate(source, where=args.input)
                transform(source, cfg).write.mode("overwrite").parquet(part_dir)
                done_rows += rows
                rate = done_rows / max(time.time() - started, 1e-9)
                left = sum(r for _, r in parts[i + 1:])
                print(f"[{stage}] part {i + 1}/{len(parts)}: {rows} rows, {rate:.1f} rows/s, "
                      f"about {left / rate:.0f}s left", flush=True)
        marked = spark.read.parquet(*[out.path(f"work/part-{i:05d}") for i in range(len(parts))])
        data, rejects = split(marked, cfg)
        counts = write_stage(out, data, rejects, n_input, cfg.output.compression)
        out.remove("work")
        out.commit(build_manifest(out, cfg.to_dict(), counts, models=models(cfg), reasons=reasons,
                                  source=source_of(source_manifest),
                                  parts={"total": len(parts), "reused_from_a_killed_run": reused}))
        print(f"{args.output}: {counts.input} rows in, {counts.output} out, {counts.rejected_total} rejected "
              f"{counts.rejected.get(stage, {})}")
        return 0


def input_parts(data_dir: str, rows_per_part: int) -> list[tuple[list[str], int]]:
    """The input's Parquet files in a fixed order, grouped to about rows_per_part rows each, with
    row counts from the file footers (no pass over the data)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(data_dir)
    proto = data_dir.split("://")[0] + "://" if "://" in data_dir else ""
    parts, files, rows = [], [], 0
    for name in sorted(fs.glob(f"{path}/*.parquet")):
        with fs.open(name, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        files.append(proto + name)
        rows += n
        if rows >= rows_per_part:
            parts.append((files, rows))
            files, rows = [], 0
    if files:
        parts.append((files, rows))
    return parts
