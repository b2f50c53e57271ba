"""Dedup precision and recall against the shapes world's ground truth (not a timed test; docs/dedup.md).

A noisy web corpus (bench/quality.py's: held-out seed 10,001, 45% of the image rows' captions wrong,
6% planted duplicates, 4% faults) is served on 127.0.0.1 and curated once (`capfilt curate`, the
shapes-world settings, threshold rule). Then, per --label, `capfilt dedup` alone is rerun on that
run's committed filter stage with the code as it is now (the shapes-world dedup settings), and its
rejects are joined with the truth (the definitions of docs/quality.md):

    precision  of the rows dedup dropped, the share that show the same scene as the row they were
               dropped for (the survivor)
    recall     of the planted copies (duplicate_image, near_duplicate_image: the same picture, maybe
               re-encoded or resized) that reached dedup together with their original, the share that
               left as one row

    .venv/bin/python bench/dedup_truth.py --label after [--n 3000] [--work /tmp/capfilt-bench-dedup-truth]
    .venv/bin/python bench/dedup_truth.py --label after --base demo-output --corpus demo-output/world

bench/dedup.py (caption clusters against datasketch) and bench/dedup_images.py (the partitioned image
search against brute force) measure against another implementation, not against the truth.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS_SEED = 10_001  # bench/quality.py's held-out corpus seed
PLANTED = ("duplicate_image", "near_duplicate_image")


def curate(metadata: Path, out: Path, port: int) -> float:
    """`capfilt curate` in a child process (shapes-world settings, threshold rule), once."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config

    if (out / "manifest.json").exists():
        return 0.0
    settings = _as_overrides(shapes_world_settings(load_config(None, ["download.retries=1"])))
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
           "--id-col", "id", "--no-progress", "--allow-host", f"127.0.0.1:{port}", "--allow-host", "127.0.0.1:1",
           *settings]
    return _run(cmd, out)


def dedup(filtered: Path, out: Path) -> float:
    """`capfilt dedup` alone in a child process, on a committed filter stage, with the shapes-world
    dedup settings and the code as it is now."""
    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.pipelines.config import load_config

    shutil.rmtree(out, ignore_errors=True)
    settings = shapes_world_settings(load_config(None, [])).dedup.__dict__
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "dedup", "--input", str(filtered), "--output", str(out),
           *[a for key, value in settings.items() for a in ("--set", f"dedup.{key}={json.dumps(value)}")]]
    return _run(cmd, out)


def _run(cmd: list[str], out: Path) -> float:
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[3]} failed for {out}:\n{proc.stdout[-4000:]}")
    return time.time() - started


def dedup_metrics(filtered: Path, out: Path, corpus: Path) -> dict:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    truth = pq.read_table(corpus / "truth.parquet", columns=["id", "kind", "scene", "duplicate_of"]).to_pandas()
    truth = truth.drop_duplicates("id", keep="first").set_index("id")  # duplicate_id faults share ids
    reached = set(ds.dataset(filtered / "data", format="parquet").to_table(columns=["uid"]).column("uid").to_pylist())
    rejects = ds.dataset(out / "rejects", format="parquet").to_table(
        columns=["uid", "stage", "reason", "duplicate_of"]).to_pylist()
    dropped = [r for r in rejects if r["stage"] == "dedup"]
    gone = {r["uid"] for r in dropped}

    def scene(uid):
        return None if truth.scene[uid] is None else json.loads(truth.scene[uid])

    right = [scene(r["uid"]) == scene(r["duplicate_of"]) for r in dropped]
    planted = [(u, truth.duplicate_of[u]) for u in truth.index[truth.kind.isin(PLANTED)]
               if u in reached and truth.duplicate_of[u] in reached]
    collapsed = sum(a in gone or b in gone for a, b in planted)
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "reached_dedup": len(reached), "dropped": len(dropped),
        "precision": round(sum(right) / max(1, len(dropped)), 4),
        "dropped_for_another_scene": len(dropped) - sum(right),
        "dropped_by_reason": dict(collections.Counter(r["reason"] for r in dropped).most_common()),
        "wrong_by_reason": dict(collections.Counter(r["reason"] for r, ok in zip(dropped, right) if not ok)),
        "planted_pairs_reaching_dedup": len(planted), "planted_pairs_collapsed": collapsed,
        "recall": round(collapsed / max(1, len(planted)), 4),
        "dedup_stage_seconds": manifest.get("seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="rows in the web corpus")
    ap.add_argument("--label", default="now", help="name of this dedup rerun (e.g. before, after)")
    ap.add_argument("--work", default="/tmp/capfilt-bench-dedup-truth")
    ap.add_argument("--base", help="a committed curate output of a shapes-world corpus to rerun dedup on "
                                   "(e.g. `capfilt demo`'s folder) instead of making one; needs --corpus")
    ap.add_argument("--corpus", help="that run's corpus folder (with truth.parquet), e.g. <demo>/world")
    args = ap.parse_args()

    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.base:
        base, corpus = Path(args.base), Path(args.corpus or "")
        run = work / f"dedup-{base.name}-{args.label}"
        if not (corpus / "truth.parquet").exists() or not (base / "manifest.json").exists():
            raise SystemExit("--base needs a committed curate output and --corpus its corpus (truth.parquet)")
    else:
        corpus = work / f"world-{args.n}"
        base, run = work / f"base-{args.n}", work / f"dedup-{args.n}-{args.label}"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=args.n, seed=CORPUS_SEED, noise=0.45, slow_ms=200, overwrite=True)
    if not (base / "manifest.json").exists():
        with serve(corpus / "site") as server:
            seconds = curate(write_metadata(corpus, server.base_url), base, server.port)
        print(f"[dedup_truth] upstream stages: {base} ({seconds:.0f}s)", flush=True)
    filtered = base / "stages" / "filter"
    seconds = dedup(filtered, run)
    result = {"label": args.label, "base": str(base), "dedup_command_seconds": round(seconds, 1),
              **dedup_metrics(filtered, run, corpus)}
    print(json.dumps(result, indent=2))
    (work / f"result-{run.name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
