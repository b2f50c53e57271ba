"""The release filters against the shapes world's ground truth (not a timed test; docs/filters.md).

1. A held-out web corpus (default 10,000 rows, seed 20261) with about 10% watermarked images and about
   1% re-encoded, resized and slightly cropped copies of a held-out evaluation set (500 images) goes
   through `capfilt curate` with `decontaminate.sets` = that set and `heads.drop` = the committed shapes
   watermark head. Caption and filter run apart (caption.fuse_filter=false), so the filter stage's own
   CLIP pass can be timed beside the heads stage.
   - decontamination: recall and precision of the planted copies among the rows that reached the
     stage, and whether the detail names the planted item;
   - watermark head: precision and recall among the rows that reached the heads stage;
   - the heads stage's seconds against the filter stage's, on the same rows.
2. The decontaminate stage alone, on that run's committed filter output, against --big evaluation
   images (default 100,000) in Parquet: its seconds, and how they split between embedding the
   evaluation images and the rest (search, confirmation, write).

    .venv/bin/python bench/release_filters.py [--n 5000] [--evals 500] [--big 100000] [--work DIR]
"""
from __future__ import annotations

import functools

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rate(hit: int, total: int) -> float | None:
    return round(hit / total, 4) if total else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=20261)
    p.add_argument("--evals", type=int, default=500)
    p.add_argument("--big", type=int, default=100_000, help="evaluation images for the cost run (0: skip)")
    p.add_argument("--work", default="/tmp/capfilt-bench-release")
    p.add_argument("--reuse", action="store_true", help="measure the committed run under --work again")
    args = p.parse_args(argv)

    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from capfilt.jobs.common import run
    from capfilt.jobs.curate import main as curate
    from capfilt.jobs.common import run_stage_job
    decontaminate = functools.partial(run_stage_job, "decontaminate")
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    from capfilt.world.corpus import make_web_corpus
    from capfilt.world.evalset import make_eval_set
    from capfilt.world.server import serve

    work = Path(args.work)
    evals, world, out = work / "shapes-eval", work / "world", work / "out"
    settings = _as_overrides(shapes_world_settings(load_config(None)))
    curate_seconds = None
    if not (args.reuse and (out / "manifest.json").exists()):
        shutil.rmtree(work, ignore_errors=True)
        make_eval_set(evals, args.evals, seed=args.seed + 1, fmt="folder")
        make_web_corpus(world, n=args.n, seed=args.seed, slow_ms=0, burst=0, watermark_rate=0.1,
                        eval_set=evals, eval_rate=0.01)
        head = ROOT / "models" / "shapes-watermark-head"
        with serve(world / "site") as server:
            from capfilt.world.corpus import write_metadata
            metadata = write_metadata(world, server.base_url)
            started = time.time()
            rc = run(curate, ["--input", str(metadata), "--id-col", "id", "--output", str(out), "--no-progress",
                              "--allow-host", f"127.0.0.1:{server.port}", "--allow-host", "127.0.0.1:1", *settings,
                              "--set", "caption.fuse_filter=false", "--set", f"decontaminate.sets=[{evals}]",
                              "--set", f"heads.drop=[{head}]"])
            if rc:
                return rc
            curate_seconds = round(time.time() - started, 1)
    truth = pq.read_table(world / "truth.parquet").to_pandas().drop_duplicates("id").set_index("id")
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = ds.dataset(out / "rejects").to_table().to_pandas().set_index("uid")

    def reached(stage):  # the rows a stage read: its predecessor's output
        chain = [s for s in manifest["stages"]]
        before = chain[chain.index(stage) - 1]
        return set(ds.dataset(out / "stages" / before / "data", partitioning="hive").to_table(columns=["uid"])
                   .column("uid").to_pylist()) if before != "download" else None

    seen = reached("decontaminate")
    planted = {u for u in seen if truth.loc[u, "eval_id"] is not None}
    flagged = set(rejects.index[rejects["reason"] == "eval_contaminated"])
    named = sum(f"/{truth.loc[u, 'eval_id']}:" in rejects.loc[u, "detail"] for u in flagged & planted)
    plain = {u for u in planted if not bool(truth.loc[u, "watermark"])}
    decon = {"rows": len(seen), "planted": len(planted), "flagged": len(flagged),
             "recall_without_a_watermark_over_the_copy": _rate(len(plain & flagged), len(plain)),
             "watermarked_copies": len(planted - plain), "watermarked_copies_found": len((planted - plain) & flagged),
             "recall": _rate(len(planted & flagged), len(planted)),
             "precision": _rate(len(planted & flagged), len(flagged)),
             "detail_names_the_planted_item": _rate(named, len(flagged & planted)),
             "false_positives": sorted(flagged - planted)[:20]}
    seen = reached("heads")
    marked = {u for u in seen if bool(truth.loc[u, "watermark"])}
    dropped = set(rejects.index[rejects["reason"] == "watermark"])
    heads = {"rows": len(seen), "watermarked": len(marked), "dropped": len(dropped),
             "precision": _rate(len(marked & dropped), len(dropped)), "recall": _rate(len(marked & dropped), len(marked))}
    stages = manifest["stages"]
    timing = {s: {"seconds": stages[s]["seconds"], "rows_in": stages[s]["rows_in"],
                  "decoded_images": stages[s].get("decoded_images")} for s in ("filter", "decontaminate", "heads")}
    timing["heads / filter"] = round(stages["heads"]["seconds"] / stages["filter"]["seconds"], 4)
    result = {"corpus": {"n": args.n, "seed": args.seed, "evals": args.evals}, "curate_seconds": curate_seconds,
              "decontamination": decon, "watermark_head": heads, "timing": timing}
    print(json.dumps(result, indent=2))
    if args.big:
        big = work / "big-eval"
        t = time.time()
        make_eval_set(big, args.big, seed=args.seed + 2, fmt="parquet", overwrite=True)
        made = time.time() - t
        t = time.time()
        shutil.rmtree(work / "decon-big", ignore_errors=True)
        rc = run(decontaminate, ["--input", str(out / "stages" / "filter"), "--output", str(work / "decon-big"), *settings,
                                 "--set", f"decontaminate.sets=[{big}]"])
        if rc:
            return rc
        m = json.loads((work / "decon-big" / "manifest.json").read_text())
        result["big"] = {"eval_images": m["models"]["eval_sets"]["images"], "rows": m["counts"]["input"],
                         "stage_seconds": m["seconds"], "wall_seconds": round(time.time() - t, 1),
                         "embed_seconds": m["models"]["eval_sets"]["embed_seconds"],
                         "generate_seconds": round(made, 1), "rejected": m["counts"]["rejected_total"]}
        print(json.dumps(result["big"], indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
