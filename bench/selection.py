"""What each selection rule keeps, against the shapes world's ground truth (not a timed test).

Runs the real filter job once per rule on a committed caption stage (e.g. the demo's), joins the
output with the corpus's truth.parquet (only benchmarks read it) and prints, per rule: the noise
rate of the web captions before and after, the fraction of aligned pairs whose web caption is kept,
images kept, how many kept synthetic captions describe their image exactly, the noise rate of all
kept (image, caption) pairs, and the aligned images that leave with a right caption.

    .venv/bin/python bench/selection.py [--run demo-output] [--threshold 0.8364]
"""
from __future__ import annotations

from capfilt.jobs.common import run_stage_job
import functools

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo-output", help="a demo output folder (world/ and stages/caption)")
    ap.add_argument("--threshold", type=float, default=None, help="default: the CLIP model card's")
    args = ap.parse_args()

    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    filter_main = functools.partial(run_stage_job, "filter")
    from capfilt.udfs.models import SHAPES_CLIP
    from capfilt.world.captions import parse
    from capfilt.world.corpus import NOISE_KINDS
    from capfilt.world.scene import Scene

    run = Path(args.run)
    card = json.loads((Path(SHAPES_CLIP) / "model_card.json").read_text())
    threshold = args.threshold if args.threshold is not None else card["metrics"]["recommended_threshold"]
    truth = pq.read_table(run / "world" / "truth.parquet", columns=["id", "kind", "fault", "scene", "aligned"]).to_pandas()
    truth = truth.drop_duplicates("id", keep="first").set_index("id")
    captioned = ds.dataset(run / "stages" / "caption" / "data").to_table(columns=["uid"]).column("uid").to_pylist()
    plain = truth.loc[[u for u in captioned if u in truth.index]]
    plain = plain[plain.fault.isna()]
    aligned_ids = set(plain.index[plain.kind.isin(["clean", "web_phrasing"])])
    noisy_ids = set(plain.index[plain.kind.isin(NOISE_KINDS)])
    print(f"{len(plain)} plain rows with images: noise rate of web captions before filtering "
          f"{len(noisy_ids) / (len(noisy_ids) + len(aligned_ids)):.3f}; CLIP {SHAPES_CLIP}, threshold {threshold}")
    rules = [("threshold", [f"filter.threshold={threshold}"]),
             ("topk", ["filter.top_k=2", f"filter.threshold={threshold}"]),
             ("topk", ["filter.top_k=2", "filter.threshold=-1"]),
             ("percentile", ["filter.percentile=0.7"])]
    print(f"{'rule':<34} {'web noise':>9} {'aligned web':>11} {'images':>6} {'synthetic':>9} "
          f"{'synth.':>6} {'pair noise':>10} {'aligned images':>14}")
    print(f"{'':<34} {'after':>9} {'kept':>11} {'kept':>6} {'kept':>9} {'exact':>6} {'after':>10} "
          f"{'kept, right':>14}")
    for rule, sets in rules:
        out = Path(tempfile.mkdtemp(prefix="selection-")) / "filter"
        argv = ["--input", str(run / "stages" / "caption"), "--output", str(out),
                "--set", f"filter.model={SHAPES_CLIP}", "--set", f"filter.rule={rule}"]
        for s in sets:
            argv += ["--set", s]
        filter_main(argv)
        rows = ds.dataset(out / "data").to_table(columns=["uid", "candidates"]).to_pylist()
        web_kept = {r["uid"] for r in rows if any(c["source"] == "web" and c["kept"] for c in r["candidates"])}
        kept_web_plain = web_kept & (aligned_ids | noisy_ids)
        synthetic = [(r["uid"], parse(c["text"]) == Scene.from_json(truth.scene[uid]))
                     for r in rows if (uid := r["uid"]) in plain.index
                     for c in r["candidates"] if c["source"] == "synthetic" and c["kept"]]
        exact = sum(right for _, right in synthetic)
        # CapFilt's view: an aligned image counts as kept when it leaves with a right caption
        # (its own web caption, or a synthetic one that parses to its scene).
        right_images = (kept_web_plain & aligned_ids) | {uid for uid, right in synthetic if right}
        pairs = len(kept_web_plain) + len(synthetic)
        wrong_pairs = len(kept_web_plain & noisy_ids) + len(synthetic) - exact
        label = f"{rule} ({', '.join(s.split('.', 1)[-1] for s in sets)})"
        print(f"{label:<34} {len(kept_web_plain & noisy_ids) / max(1, len(kept_web_plain)):>9.3f} "
              f"{len(kept_web_plain & aligned_ids) / len(aligned_ids):>11.3f} {len(rows):>6} "
              f"{len(synthetic):>9} {exact / max(1, len(synthetic)):>6.3f} {wrong_pairs / max(1, pairs):>10.3f} "
              f"{len(right_images & aligned_ids) / len(aligned_ids):>14.3f}", flush=True)

if __name__ == "__main__":
    main()
