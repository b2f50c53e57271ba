"""`capfilt curate` / `spark-submit jobs/curate.py`: the whole chain in one job.

download -> caption -> filter -> dedup -> write. Each stage commits its output under
OUTPUT/stages/<stage>/ as the stage jobs do; a rerun skips committed stages, so a failed or killed run
resumes where it stopped (download and the model passes also resume inside the stage). Caption and
filter run in one pass over each image (decoded once, both models in the same task) unless
caption.fuse_filter is false. A rerun that changes only selection or dedup settings recomputes those
from the stored scores, loading no model. The write step publishes OUTPUT/curated (Parquet for
pretraining), OUTPUT/rejects (every dropped row with stage and reason) and OUTPUT/manifest.json, and
fails loudly when input != curated + rejected. docs/output.md has the layout; `capfilt inspect
OUTPUT` shows it, `capfilt export OUTPUT` writes training manifests.
"""
from __future__ import annotations

import argparse
import sys
import time

from capfilt.jobs.common import config_from_args, run

RUN, REUSE, RESELECT = "run", "reuse", "recompute without a model"


def parser() -> argparse.ArgumentParser:
    from capfilt.jobs.download import add_input_args
    p = argparse.ArgumentParser(prog="capfilt curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, output="output folder: stages/, curated/, rejects/, manifest.json",
                   retry="first re-download the retryable failures of a committed download stage")
    return p


def plan(out_root: str, cfg, source: dict, retry_failed: bool = False) -> dict[str, str]:
    """What this run does with each stage: run it (not committed yet, --overwrite, download with
    --retry-failed, or after a stage that runs: its committed output was made from the old data),
    reuse it, or recompute it without a model (only settings that need no model pass changed:
    selection, dedup). A committed stage made with other model settings or from another input is
    refused, naming what differs."""
    from capfilt.pipelines.output import StageOutput, read_manifest
    from capfilt.pipelines.provenance import changed_keys, source_of, stale_reason
    from capfilt.pipelines.publish import active_stages, stage_dir
    from capfilt.pipelines.stage import definition
    actions, redo, stale, previous = {}, cfg.output.overwrite, [], None
    for stage in active_stages(cfg):
        root = stage_dir(out_root, stage)
        committed = StageOutput(root, stage).complete
        if redo or not committed or (stage == "download" and retry_failed):
            actions[stage] = RUN
        else:
            manifest = read_manifest(root)
            why = stale_reason(manifest, cfg.to_dict(), stage, source if stage == "download" else None)
            read = manifest.get("chain", [[None], [None]])[-2][0] if stage != "download" else None
            if why is None and read != previous:  # a stage was switched on or off before it
                why = f"another chain (it read {read}, this run's stage before it is {previous})"
            # The stage it read was committed again after it (a stage command into OUT/stages, a copy):
            # what it computed came from the old rows, so it runs again (its model too, if it has one).
            moved = stage != "download" and actions.get(previous) == REUSE and manifest.get("source") not in (
                None, source_of(read_manifest(stage_dir(out_root, previous))))
            model = None if stage == "download" else definition(stage).model
            if why is None and not moved:
                actions[stage] = REUSE
            elif why is None or stage != "download" and (model is None or (
                    definition(stage).keeps_scores and not changed_keys(manifest["config"], cfg.to_dict(), model.keys))):
                actions[stage] = RUN if moved and model is not None else RESELECT  # new input: model too
            else:
                stale.append(f"{stage} under {out_root}/stages was made with {why} than this run's")
        redo = redo or actions.get(stage) in (RUN, RESELECT)
        previous = stage
    if stale:
        raise ValueError("; ".join(stale) + ": rerun with --overwrite to recompute, or use the input and "
                         "settings of that run")
    return actions


def main(argv=None) -> int:
    from capfilt.jobs.download import input_spec
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    return curate(cfg, input_spec(args), args.output, args.retry_failed, progress=not args.no_progress)


def curate(cfg, spec, output: str, retry_failed: bool = False, progress: bool = True) -> int:
    """The chain over the stage objects with one Config: download, then each stage by the runner,
    then the write step."""
    from capfilt.jobs.common import check_models
    from capfilt.jobs.download import check, run_download
    from capfilt.pipelines.output import OutputLock, check_out_replaceable
    from capfilt.pipelines.provenance import input_source
    from capfilt.pipelines.publish import publish, stage_dir
    from capfilt.pipelines.session import spark_session
    from capfilt.pipelines.stage import definition, run_stage

    started = time.time()
    out = str(output).rstrip("/")
    check(spec, out, cfg, retry=retry_failed, replaced=("stages", "curated", "rejects"))
    check_out_replaceable(out)  # only capfilt's own stages/, curated/, rejects/ and manifest are replaced
    with OutputLock(out):
        actions = plan(out, cfg, input_source(spec), retry_failed)
        fuse = cfg.caption.fuse_filter and actions["caption"] == RUN and actions["filter"] == RUN
        check_models(cfg, [stage for stage, action in actions.items() if action == RUN],
                     reselect=[stage for stage, action in actions.items() if action == RESELECT])
        spark = spark_session(cfg.spark)
        print(f"[curate] Spark {spark.version}, master {spark.sparkContext.master}, UI {spark.sparkContext.uiWebUrl}",
              flush=True)
        previous = None
        for i, stage in enumerate(actions, 1):
            action = actions[stage]
            note = {REUSE: ": committed by an earlier run, reused",
                    RESELECT: ": recomputed from the stored scores, no model loaded",
                    RUN: " (caption and filter in one pass over each image)" if fuse and stage == "caption" else ""}
            print(f"\n[curate] stage {i}/{len(actions)}: {stage}  ({time.time() - started:.0f}s){note[action]}",
                  flush=True)
            root = stage_dir(out, stage)
            if stage == "download" and action == RUN:
                run_download(cfg, spec, root, retry_failed, progress=progress)
            elif stage != "download" and action != REUSE:
                run_stage(definition(stage), cfg, previous, root, recompute=True,
                          fuse=[definition("filter").model] if fuse and stage == "caption" else [])
            previous = root
        print(f"\n[curate] write: {out}/curated, {out}/rejects, {out}/manifest.json", flush=True)
        manifest = publish(spark, out, cfg.to_dict(), cfg.output.compression, cfg.output.target_file_mb, started,
                           reused=tuple(stage for stage, action in actions.items() if action == REUSE))
    counts = manifest["counts"]
    print(f"[curate] done in {manifest['seconds']:.0f}s: {counts['input']} rows in, {counts['output']} curated, "
          f"{counts['rejected_total']} rejected")
    for stage in ("prefilter", *actions):
        for reason, n in sorted(counts["rejected"].get(stage, {}).items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<13} {reason:<24} {n:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
