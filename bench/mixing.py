"""Captions mixed at export, measured downstream (issue 35; not a timed test; docs/quality.md).

One curated OUT with synthetic captions (e.g. bench/shaping.py's or bench/quality.py's `clip` run) is
exported as WebDataset by `capfilt export --captions` once per arm:

  mix-P   --captions mix --synthetic-share P, for each P in --shares (0: web captions, 1: synthetic ones,
          each falling back to the other source where a row kept none of it)
  all     --captions all: every kept caption its own sample, as BLIP trains

and fresh small CLIPs (bench/quality.py's train_and_measure: the same architecture, steps and batch for every
arm, one torch thread each) train on each export's samples, read back from its tars, for each seed. Measured
by R@1 among 1000 (both directions averaged) on bench/quality.py's uniform held-out set, per seed.

    .venv/bin/python bench/mixing.py --out OUT [--shares 0 0.5 0.8 1] [--seeds 0 1 2] [--steps 600]
        [--jobs 2] [--work /tmp/capfilt-bench-mixing] [--json docs/mixing.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.quality import _decode, retrieval_data, train_missing, training_args  # noqa: E402


def export(out: Path, to: Path, options: list[str]) -> dict:
    """`capfilt export` in a child process; its summary. An earlier export in `to` is reused only when it was
    made from this OUT as it is now (its export.json names the source and the source's finish time)."""
    finished = json.loads((out / "manifest.json").read_text()).get("finished_at")
    summary = to / "export.json"
    earlier = json.loads(summary.read_text()) if summary.exists() else {}
    if (earlier.get("source"), earlier.get("source_finished_at")) == (str(out), finished):
        return earlier
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "export", str(out), "--format", "webdataset",
           "--to", str(to), "--overwrite", *options]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"export failed for {to}:\n{proc.stdout[-4000:]}")
    return json.loads(summary.read_text())


def samples(folder: Path):
    """(images N x H x W x 3, captions) of every sample in an export's tars, in key order."""
    import numpy as np
    images, captions = [], []
    for shard in sorted(folder.glob("shard-*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(parts):
            sample = parts[key]
            image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
            images.append(_decode(image))
            captions.append(sample["txt"].decode("utf-8"))
    return np.stack(images), captions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a curated OUT whose rows kept synthetic captions")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 0.8, 1.0])
    training_args(ap, "/tmp/capfilt-bench-mixing")
    args = ap.parse_args()

    import numpy as np
    work, out = Path(args.work), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    arms = {f"mix-{p:g}": ["--captions", "mix", "--synthetic-share", str(p)] for p in args.shares}
    arms["all"] = ["--captions", "all"]
    summaries = {arm: export(out, work / "exports" / arm, options) for arm, options in arms.items()}
    print(json.dumps({arm: s["captions"] | {"samples": s["samples"]} for arm, s in summaries.items()}), flush=True)

    # The trainings' results are kept per OUT (as it is now), arm, seed and budget: a rerun trains what is missing.
    source = hashlib.sha256(f"{out}|{summaries['all']['source_finished_at']}".encode()).hexdigest()[:12]
    data_file, cache = work / f"arms-{source}.npz", work / "downstream"
    cache.mkdir(exist_ok=True)
    tag = f"{source}-{args.steps}x{args.batch}-lr{args.lr}-eval{args.eval_n}"
    tasks = {cache / f"{arm}-seed{seed}-{tag}.json": (arm, seed, args.steps, args.batch, args.lr, str(data_file))
             for arm in arms for seed in args.seeds}
    started = time.time()
    if not all(path.exists() for path in tasks):
        images, texts, keys = retrieval_data(args.eval_n)
        data = {arm: samples(work / "exports" / arm) for arm in arms}
        np.savez(data_file, eval_images=images, eval_texts=np.array(texts), eval_keys=np.array(keys),
                 **{f"{arm}_images": d[0] for arm, d in data.items()},
                 **{f"{arm}_captions": np.array(d[1]) for arm, d in data.items()})
        train_missing(tasks, args.jobs)
    results = [json.loads(p.read_text()) for p in tasks]
    per_arm = {arm: {r["seed"]: r["r1_1000"] for r in results if r["arm"] == arm} for arm in arms}
    report = {"out": str(out), "exports": {arm: s["captions"] | {"samples": s["samples"]} for arm, s in summaries.items()},
              "r1_1000": per_arm, "mean": {arm: round(sum(v.values()) / len(v), 4) for arm, v in per_arm.items()},
              "train_images": {r["arm"]: r["train_images"] for r in results},
              "settings": {k: getattr(args, k) for k in ("shares", "seeds", "steps", "batch", "lr", "eval_n")},
              "train_seconds": round(time.time() - started, 1)}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
