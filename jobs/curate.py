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

from jobs.common import check_models, config_from_args, run


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


def plan(out_root: str, cfg, source: dict, retry_failed: bool = False) -> dict[str, bool]:
    """Which stages this run computes: every stage not committed yet, every stage after one that runs
    (its committed output was made from the old data), all with --overwrite, and download with
    --retry-failed. A committed stage that would be reused but was computed with other settings or
    from another input is refused, naming what differs."""
    from pipelines.output import StageOutput, read_manifest
    from pipelines.provenance import stale_reason
    from pipelines.publish import STAGES, stage_dir
    runs, redo, stale = {}, cfg.output.overwrite, []
    for stage in STAGES:
        root = stage_dir(out_root, stage)
        committed = StageOutput(root, stage).complete
        runs[stage] = redo or not committed or (stage == "download" and retry_failed)
        if committed and not cfg.output.overwrite:
            why = stale_reason(read_manifest(root), cfg.to_dict(), stage,
                               source if stage == "download" else None)
            if why and not runs[stage]:
                stale.append(f"{stage} under {out_root}/stages was made with {why} than this run's")
        redo = redo or runs[stage]
    if stale:
        raise ValueError("; ".join(stale) + ": rerun with --overwrite to recompute, or use the input and "
                         "settings of that run")
    return runs


def main(argv=None) -> int:
    from jobs.download import check, input_spec
    from pipelines.output import OutputLock
    from pipelines.provenance import input_source
    from pipelines.publish import STAGES, publish, stage_dir
    from pipelines.session import spark_session

    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    started = time.time()
    out = str(args.output).rstrip("/")
    spec = input_spec(args)
    check(spec, out, cfg, retry=args.retry_failed, replaced=("stages", "curated", "rejects"))
    with OutputLock(out):
        runs = plan(out, cfg, input_source(spec), args.retry_failed)
        check_models(cfg, [stage for stage, run_it in runs.items() if run_it])
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
        previous = args.input
        for i, stage in enumerate(STAGES, 1):
            print(f"\n[curate] stage {i}/{len(STAGES)}: {stage}  ({time.time() - started:.0f}s)"
                  + ("" if runs[stage] else ": committed by an earlier run, reused"), flush=True)
            if runs[stage]:
                retry = stage == "download" and args.retry_failed
                stage_args = ["--input", previous, "--output", stage_dir(out, stage), *passthrough,
                              *([] if retry else ["--overwrite"])]
                rc = importlib.import_module(f"jobs.{stage}").main(
                    stage_args + (download_args if stage == "download" else []))
                if rc:
                    print(f"[curate] stage {stage} failed (exit {rc}): rerun the same command to resume",
                          file=sys.stderr)
                    return rc
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
