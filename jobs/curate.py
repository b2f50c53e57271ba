"""`capfilt curate` / `spark-submit jobs/curate.py`: the whole chain in one job.

download -> caption -> filter -> dedup -> write. Each stage commits its output under
OUTPUT/stages/<stage>/ as the stage jobs do; a rerun skips committed stages, so a failed or killed run
resumes where it stopped (download also resumes inside the stage). The write step publishes
OUTPUT/curated (Parquet for pretraining), OUTPUT/rejects (every dropped row with stage and reason)
and OUTPUT/manifest.json, and fails loudly when input != curated + rejected. docs/output.md has the
layout; `capfilt inspect OUTPUT` shows it, `capfilt export OUTPUT` writes training manifests.
"""
from __future__ import annotations

import importlib
import sys
import time

from jobs.common import add_config_args, config_from_args, run

# Config sections whose settings a committed stage was computed with (seed seeds caption sampling).
SETTINGS = {"download": ("download",), "caption": ("caption", "seed"), "filter": ("filter",),
            "dedup": ("dedup", "seed")}


def parser():
    from jobs.download import parser as download_parser
    p = download_parser()
    p.prog = "capfilt curate"
    p.description = __doc__
    for action in p._actions:
        if action.dest == "input":
            action.help = "metadata of the dump: a parquet/csv/jsonl file, a folder or a glob"
        elif action.dest == "output":
            action.help = "output folder: stages/, curated/, rejects/, manifest.json"
        elif action.dest == "retry_failed":
            action.help = "first re-download the retryable failures of a committed download stage"
    return p


def stale_stages(out_root: str, cfg) -> list[str]:
    """Committed stages computed with other settings than cfg's (rerunning would reuse them)."""
    from pipelines.output import NotCommittedError, read_manifest
    from pipelines.publish import STAGES, stage_dir
    current, stale = cfg.to_dict(), []
    for stage in STAGES:
        try:
            used = read_manifest(stage_dir(out_root, stage)).get("config", {})
        except NotCommittedError:
            continue
        if any(used.get(key) != current.get(key) for key in SETTINGS[stage]):
            stale.append(stage)
    return stale


def main(argv=None) -> int:
    from pipelines.output import StageOutput
    from pipelines.publish import STAGES, publish, stage_dir
    from pipelines.session import spark_session

    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    started = time.time()
    out = str(args.output).rstrip("/")
    if not cfg.output.overwrite:
        stale = stale_stages(out, cfg)
        if stale:
            raise ValueError(f"{', '.join(stale)} under {out}/stages was computed with other settings than "
                             f"this run's: rerun with --overwrite to recompute, or use the settings of that run")
    spark = spark_session(cfg.spark)
    print(f"[curate] Spark {spark.version}, master {spark.sparkContext.master}, UI {spark.sparkContext.uiWebUrl}",
          flush=True)
    passthrough = [*(["--config", args.config] if args.config else []),
                   *[arg for kv in args.overrides for arg in ("--set", kv)]]
    download_args = ["--input-format", args.input_format, "--preset", args.preset,
                     *[a for flag, v in (("--url-col", args.url_col), ("--caption-col", args.caption_col),
                                         ("--id-col", args.id_col)) if v for a in (flag, v)],
                     *[a for host in args.allow_host for a in ("--allow-host", host)],
                     *(["--retry-failed"] if args.retry_failed else []),
                     *(["--no-progress"] if args.no_progress else [])]
    # Once a stage runs, every later stage runs again: its committed output was made from the old data.
    redo, previous = cfg.output.overwrite, args.input
    for i, stage in enumerate(STAGES, 1):
        committed = StageOutput(stage_dir(out, stage), stage).complete
        runs = redo or not committed or (stage == "download" and args.retry_failed)
        print(f"\n[curate] stage {i}/{len(STAGES)}: {stage}  ({time.time() - started:.0f}s)"
              + ("" if runs else ": committed by an earlier run, reused"), flush=True)
        if runs:
            stage_args = ["--input", previous, "--output", stage_dir(out, stage), *passthrough,
                          *(["--overwrite"] if redo and not (stage == "download" and args.retry_failed) else [])]
            rc = importlib.import_module(f"jobs.{stage}").main(
                stage_args + (download_args if stage == "download" else []))
            if rc:
                print(f"[curate] stage {stage} failed (exit {rc}): rerun the same command to resume",
                      file=sys.stderr)
                return rc
            redo = True
        previous = stage_dir(out, stage)
    print(f"\n[curate] write: {out}/curated, {out}/rejects, {out}/manifest.json", flush=True)
    manifest = publish(spark, out, cfg.to_dict(), cfg.output.compression, cfg.output.target_file_mb, started)
    counts = manifest["counts"]
    print(f"[curate] done in {manifest['seconds']:.0f}s: {counts['input']} rows in, {counts['output']} curated, "
          f"{counts['rejected_total']} rejected")
    for stage in STAGES:
        for reason, n in sorted(counts["rejected"].get(stage, {}).items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<10} {reason:<24} {n:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
