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

def parser() -> argparse.ArgumentParser:
    from capfilt.jobs.download import add_input_args
    p = argparse.ArgumentParser(prog="capfilt curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, output="output folder: stages/, curated/, rejects/, manifest.json",
                   retry="first re-download the retryable failures of a committed download stage")
    return p


def plan(out_root: str, cfg, source: dict, retry_failed: bool = False) -> dict:
    """{stage: Decision} for this run's chain, each stage decided by `decide` (pipelines/provenance.py)
    from its committed output under OUT/stages: run it, reuse it, or recompute it without a model. A stage
    after one that runs runs too (its committed output was made from the old rows). A committed stage made
    with other model settings or from another input is refused, naming what differs, before anything runs."""
    from capfilt.pipelines.output import StageOutput, read_manifest
    from capfilt.pipelines.provenance import REFUSE, REUSE, RUN, Decision, decide, source_of
    from capfilt.pipelines.publish import stage_dir
    from capfilt.pipelines.registry import active
    decisions, previous = {}, None
    for stage in active(cfg):
        root = stage_dir(out_root, stage.name)
        manifest = read_manifest(root) if StageOutput(root, stage.name).complete else None
        upstream = decisions.get(previous)
        # A retry reads the input the committed download kept, not --input: only its settings count.
        here = (None if retry_failed else source) if previous is None else (
            source_of(read_manifest(stage_dir(out_root, previous))) if upstream.action == REUSE else None)
        decision = decide(stage, manifest, cfg.to_dict(), here, overwrite=cfg.output.overwrite,
                          upstream_ran=upstream is not None and upstream.action != REUSE, previous=previous,
                          owns_chain=True, inputs=stage.inputs(cfg))
        if previous is None and retry_failed and decision.action == REUSE:
            decision = Decision(RUN, "--retry-failed")
        if decision.action != REFUSE:  # refusals are named together below
            stage.preflight(root, decision, {"retry_failed": retry_failed and previous is None})
        decisions[stage.name] = decision
        previous = stage.name
    stale = [f"{name} under {out_root}/stages was made with {d.why} than this run's" for name, d in decisions.items()
             if d.action == REFUSE]
    if stale:
        raise ValueError("; ".join(stale) + ": rerun with --overwrite to recompute, or use the input and "
                         "settings of that run")
    return decisions


def main(argv=None) -> int:
    from capfilt.jobs.download import input_spec
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    return curate(cfg, input_spec(args), args.output, args.retry_failed, progress=not args.no_progress)


def curate(cfg, spec, output: str, retry_failed: bool = False, progress: bool = True) -> int:
    """The chain over the stage objects with one Config: each stage by the runner, then the write step."""
    from capfilt.jobs.common import check_models
    from capfilt.jobs.download import check
    from capfilt.pipelines.output import OutputLock, check_out_replaceable
    from capfilt.pipelines.provenance import RESELECT, REUSE, RUN, input_source
    from capfilt.pipelines.publish import publish, stage_dir
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.session import spark_session
    from capfilt.pipelines.stage import run_stage

    started = time.time()
    out = str(output).rstrip("/")
    check(spec, out, cfg, retry=retry_failed, replaced=("stages", "curated", "rejects"))
    check_out_replaceable(out)  # only capfilt's own stages/, curated/, rejects/ and manifest are replaced
    with OutputLock(out):
        decisions = plan(out, cfg, input_source(spec), retry_failed)
        actions = {name: d.action for name, d in decisions.items()}
        check_models(cfg, [name for name, action in actions.items() if action == RUN],
                     reselect=[name for name, action in actions.items() if action == RESELECT])
        spark = spark_session(cfg.spark)
        print(f"[curate] Spark {spark.version}, master {spark.sparkContext.master}, UI {spark.sparkContext.uiWebUrl}",
              flush=True)
        names = list(actions)
        # A stage may run the next one's model pass in its own (caption and filter: one decode per image).
        fused = {name: nxt for name, nxt in zip(names, names[1:]) if definition(name).fuse_next(cfg)
                 and definition(nxt).model and actions[name] == RUN and actions[nxt] == RUN}
        previous = spec
        for i, name in enumerate(names, 1):
            stage, action = definition(name), actions[name]
            note = {REUSE: ": committed by an earlier run, reused",
                    RESELECT: ": recomputed from the stored scores, no model loaded, nothing fetched again",
                    RUN: f" ({name} and {fused[name]} in one pass over each image)" if name in fused else ""}
            print(f"\n[curate] stage {i}/{len(names)}: {name}  ({time.time() - started:.0f}s){note[action]}",
                  flush=True)
            root = stage_dir(out, name)
            if action != REUSE or stage.run is not None:
                run_stage(stage, cfg, previous, root, recompute=stage.reads is not None,
                          fuse=[(fused[name], definition(fused[name]).model)] if name in fused else [],
                          options={"retry_failed": retry_failed, "progress": progress})
            previous = root
        print(f"\n[curate] write: {out}/curated, {out}/rejects, {out}/manifest.json", flush=True)
        manifest = publish(spark, out, cfg.to_dict(), cfg.output.compression, cfg.output.target_file_mb, started,
                           reused=tuple(name for name, action in actions.items() if action == REUSE),
                           chain=tuple(actions))
    counts = manifest["counts"]
    print(f"[curate] done in {manifest['seconds']:.0f}s: {counts['input']} rows in, {counts['output']} curated, "
          f"{counts['rejected_total']} rejected")
    for stage in manifest["stages"]:
        for reason, n in sorted(counts["rejected"].get(stage, {}).items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<13} {reason:<24} {n:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
