"""Argument handling shared by every job: --config FILE, --set key=value, --overwrite."""
from __future__ import annotations

import argparse
import sys

from capfilt.pipelines.config import Config, ConfigError, load_config


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
    from capfilt.schemas import SchemaError
    from capfilt.pipelines.output import ConservationError, NotCommittedError, OutputInUse
    from capfilt.udfs.models import ModelNotAvailable, UnsafeCheckpoint
    try:
        return main(argv) or 0
    except (ConfigError, SchemaError, NotCommittedError, ConservationError, ValueError, OutputInUse,
            ModelNotAvailable, UnsafeCheckpoint) as e:
        print(f"capfilt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncapfilt: interrupted: committed work is kept; rerun the same command to resume", file=sys.stderr)
        return 130


def check_models(cfg: Config, stages, input_root: str | None = None, reselect=()) -> None:
    """Check every model, head and evaluation-set reference the given stages will read, on the driver
    before Spark starts (each stage declares what it reads: Stage.check_inputs): a missing path, a broken
    file or an unsafe checkpoint is one line now, not executor tracebacks hours later. `input_root`: the
    stage command's input (None in curate); `reselect`: stages recomputed from stored scores (no model pass)."""
    from capfilt.pipelines.registry import definition
    for name in [*stages, *reselect]:
        definition(name).check_inputs(cfg, input_root, model=name not in reselect)


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


def run_stage_job(name: str, argv=None) -> int:
    """A stage command: --input (a committed stage output) -> --output, by the stage runner."""
    from capfilt.pipelines.output import check_replaceable, enclosing_lock
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import run_stage
    stage = definition(name)
    if stage.reads is None or stage.command:  # it reads the input metadata, with options of its own
        raise ValueError(f"the {name} stage has a command of its own: capfilt {name} --help")
    p = argparse.ArgumentParser(prog=f"capfilt {name}", description=f"{stage.help}. One stage of the chain alone: "
                                f"reads a committed stage output, commits its own (docs/architecture.md).")
    p.add_argument("--input", required=True, help="the previous stage's output directory")
    p.add_argument("--output", required=True, help="this stage's output directory")
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    check_output_path(args.output, args.input)
    check_replaceable(args.output, name)
    check_models(cfg, [name], args.input)  # before Spark starts, as curate does
    with enclosing_lock(args.output):  # a stage of a curate output: OUT is rewritten, and goes stale
        run_stage(stage, cfg, args.input, args.output)
    return 0
