"""`capfilt download` / `spark-submit jobs/download.py`: fetch the images of a LAION-style dump.

Writes OUTPUT/data (downloaded records), OUTPUT/rejects (every other row, with its reason),
OUTPUT/manifest.json and OUTPUT/input (the prepared input, kept for --retry-failed).
A killed run resumes where it stopped (finished img2dataset shards are skipped) when rerun with
the same input and settings. --retry-failed re-downloads only rows that failed with a retryable
reason (5xx, timeout, reset, refused, failed shard, a host given up after Retry-After, an unreachable
robots.txt: asked again first) and merges them into the committed output.
"""
from __future__ import annotations

import argparse
import sys

from capfilt.jobs.common import add_config_args, check_output_path, config_from_args, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capfilt download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, output="stage output directory",
                   retry="re-download the retryable failures of a committed output and merge them")
    return p


def add_input_args(p: argparse.ArgumentParser, output: str, retry: str) -> None:
    """The arguments of a run that starts from a metadata dump (download and curate)."""
    p.add_argument("--input", required=True, help="metadata: a parquet/csv/jsonl file, a folder or a glob")
    p.add_argument("--output", required=True, help=output)
    p.add_argument("--input-format", default="auto", choices=["auto", "parquet", "csv", "jsonl"])
    p.add_argument("--preset", default="default", choices=["default", "laion"],
                   help="column names: default (url, caption) or laion (URL, TEXT, SAMPLE_ID)")
    p.add_argument("--url-col", help="column holding the image URL")
    p.add_argument("--caption-col", help="column holding the caption")
    p.add_argument("--id-col", help="column holding a unique row id (else uid = hash of url+caption)")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="let this private/loopback endpoint through the address policy (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help=retry)
    p.add_argument("--no-progress", action="store_true", help="no periodic progress lines")
    add_config_args(p)


def main(argv=None) -> int:
    from capfilt.jobs.common import check_models
    from capfilt.pipelines.output import check_replaceable, enclosing_lock
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import run_stage
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    spec = input_spec(args)
    check(spec, args.output, cfg, retry=args.retry_failed)
    check_models(cfg, ["download"])
    check_replaceable(args.output, "download")
    with enclosing_lock(args.output):  # OUT/stages/download of a curate output: OUT goes stale
        run_stage(definition("download"), cfg, spec, args.output,
                  options={"retry_failed": args.retry_failed, "progress": not args.no_progress})
    return 0


def input_spec(args):
    from capfilt.pipelines.inputs import InputSpec
    spec = InputSpec.from_preset(args.input, args.preset, url_col=args.url_col, caption_col=args.caption_col,
                                 id_col=args.id_col)
    return InputSpec(**{**spec.__dict__, "format": args.input_format})


def check(spec, output: str, cfg, retry: bool = False, replaced: tuple[str, ...] = ("",)) -> None:
    """Everything about the arguments that can be wrong, checked before Spark starts: one line each.
    A retry reads the input the committed output kept, not --input. (The settings are the stage's
    own check: Stage.check_inputs.)"""
    from capfilt.pipelines.inputs import check_input
    if not retry:
        check_input(spec)
    check_output_path(output, None if retry else spec.path, replaced)


if __name__ == "__main__":
    sys.exit(run(main))
