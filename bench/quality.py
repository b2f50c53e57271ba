"""What curation buys, measured against the shapes world's ground truth (not a timed test; docs/quality.md).

1. Curation. A noisy web corpus on a held-out seed (default 10,000 rows, 45% of the image rows'
   captions wrong, 6% planted duplicates, 4% faults of every kind) is served on 127.0.0.1 and goes
   through `capfilt curate` (Spark local mode, the project's small models) once per scorer (the
   filter's `scorer`: clip, itm, two_step; the threshold rule), each once with the captioner (CapFilt)
   and once filter-only (`caption.num_captions=0`). Every run's CLIP is the fair one,
   models/shapes-clip-web (its token set covers the web phrasings), so filter-only is not handicapped
   by words its filter cannot read. The later runs reuse the first run's committed download (and
   caption) stages. Each output is joined with the ground-truth sidecar (truth.parquet, which only
   benchmarks read): noise rate before and after, clean pairs kept, kept fraction per kind, synthetic
   caption accuracy, duplicates removed (precision, recall).
2. Downstream, in the DataComp spirit: fresh small CLIPs (the shapes CLIP's architecture with the web
   token set, the same steps and batch for every arm) trained on the raw downloaded pairs, each run's
   output, and the downloaded images with true captions (oracle), one caption per image as the
   exports give it; R@1 among 100 and among 1000 on held-out annotated images, for several seeds.

    .venv/bin/python bench/quality.py [--n 10000] [--seeds 0 1 2] [--steps 600] [--jobs 2]
        [--runs clip clip_filter_only itm ...] [--work /tmp/capfilt-bench-quality]
        [--json docs/quality.json] [--svg docs/quality.svg]

Committed curate outputs and trained models' figures under --work are reused by a rerun with the
same settings; delete --work to start over.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS_SEED = 10_001  # held out: the models train on seeds below 10,000, `lab eval` uses 10,000
RETRIEVAL_SEED = 10_002
SCORERS = ("clip", "itm", "two_step")
FIRST = "clip"  # the run whose download and caption stages the others reuse


def run_overrides() -> dict[str, list[str]]:
    """run name -> config overrides on top of the shapes-world settings (the threshold rule)."""
    from capfilt.jobs.demo import _card_threshold
    from capfilt.udfs.models import SHAPES_CLIP_WEB, SHAPES_ITM
    clip = [f"filter.model={SHAPES_CLIP_WEB}", f"filter.threshold={_card_threshold(SHAPES_CLIP_WEB, 0.0)}"]
    itm = [f"filter.itm_model={SHAPES_ITM}", f"filter.itm_threshold={_card_threshold(SHAPES_ITM, 0.5)}"]
    runs = {"clip": clip, "itm": clip + ["filter.scorer=itm"] + itm,
            "two_step": clip + ["filter.scorer=two_step", "filter.clip_floor="
                                f"{_card_threshold(SHAPES_CLIP_WEB, 0.0, 'floor_keeping_99pct')}"] + itm}
    for scorer in SCORERS:
        runs[f"{scorer}_filter_only"] = runs[scorer] + ["caption.num_captions=0"]
    return runs


def arms(runs, raw: bool = False) -> tuple[str, ...]:
    return (*(("raw",) if raw else ()), *runs, "oracle")


PLANTED_DUPLICATES = ("duplicate_image", "near_duplicate_image")


# --- curation ------------------------------------------------------------------------------------

def curate(metadata: Path, out: Path, port: int, overrides: list[str], reuse: tuple[Path, list[str]] | None) -> float:
    """`capfilt curate` in a child process; reuse=(run, stages) copies those committed stages first."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config

    if (out / "manifest.json").exists():
        print(f"[quality] {out} is committed: reused", flush=True)
        return json.loads((out / "manifest.json").read_text())["seconds"]
    if reuse is not None:
        shutil.rmtree(out, ignore_errors=True)
        for stage in reuse[1]:
            shutil.copytree(reuse[0] / "stages" / stage, out / "stages" / stage)
    settings = _as_overrides(shapes_world_settings(load_config(None, ["download.retries=1"])))
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
           "--id-col", "id", "--no-progress", "--allow-host", f"127.0.0.1:{port}", "--allow-host", "127.0.0.1:1",
           *settings, *[a for kv in overrides for a in ("--set", kv)]]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"curate failed for {out}:\n{proc.stdout[-4000:]}")
    print(f"[quality] curate -> {out}: {time.time() - started:.0f}s", flush=True)
    return time.time() - started


def load_truth(corpus: Path):
    import pyarrow.parquet as pq

    from capfilt.world.scene import Scene
    truth = pq.read_table(corpus / "truth.parquet", columns=["id", "kind", "fault", "scene", "aligned", "duplicate_of"])
    truth = truth.to_pandas().drop_duplicates("id", keep="first").set_index("id")  # duplicate_id faults share ids
    truth["scene_obj"] = [None if s is None else Scene.from_json(s) for s in truth.scene]
    root = [d if k in PLANTED_DUPLICATES else uid for uid, k, d in zip(truth.index, truth.kind, truth.duplicate_of)]
    truth["group"] = root  # a planted copy and its original share a group
    return truth


def _right(text, scene) -> bool:
    from capfilt.world.captions import parse
    return scene is not None and parse(text) == scene


def _source(row, text) -> str:
    return next(c["source"] for c in row["candidates"] if c["kept"] and c["text"] == text)


def _what_differs(said, scene) -> str:
    """Which attributes a wrong caption gets wrong: 'shape', 'colour+size', 'object count', 'unparsable'."""
    if said is None:
        return "unparsable"
    if len(said.objects) != len(scene.objects):
        return "object count"
    fields = {f for a, b in zip(said.objects, scene.objects) for f in ("colour", "shape", "size")
              if getattr(a, f) != getattr(b, f)}
    fields |= {"background"} if said.background != scene.background else set()
    return "+".join(sorted(fields)) or "order"


def curation_metrics(out: Path, truth) -> dict:
    """One curate output joined with the truth."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from capfilt.world.captions import parse

    def table(path, columns):
        return ds.dataset(path, format="parquet").to_table(columns=columns).to_pylist()

    downloaded = [r["uid"] for r in table(out / "stages" / "download" / "data", ["uid"])]
    reached_dedup = {r["uid"] for r in table(out / "stages" / "filter" / "data", ["uid"])}
    curated = table(out / "curated", ["uid", "caption_primary", "candidates"])
    rejects = pq.read_table(out / "rejects", columns=["uid", "stage", "reason", "duplicate_of"]).to_pylist()
    scene = truth.scene_obj
    kept = {r["uid"]: r for r in curated}
    down = truth.loc[downloaded]

    noisy_before = float((down.aligned == False).mean())  # noqa: E712 (pandas)
    wrong_after = [not _right(r["caption_primary"], scene[r["uid"]]) for r in curated]
    pairs = [(r["uid"], c) for r in curated for c in r["candidates"] if c["kept"]]
    wrong_pairs = [not _right(c["text"], scene[uid]) for uid, c in pairs]

    # Clean pairs kept: aligned rows that leave with a right caption, themselves or through the row of
    # the same scene that dedup kept in their place (a duplicate removed is not a clean pair lost).
    survivor_of = {r["uid"]: r["duplicate_of"] for r in rejects if r["stage"] == "dedup"}

    def leaves_right(uid) -> bool:
        final = uid
        while final in survivor_of:
            final = survivor_of[final]
        return final in kept and scene[final] == scene[uid] and _right(kept[final]["caption_primary"], scene[uid])

    aligned = down.index[down.aligned == True]  # noqa: E712
    clean_kept = [leaves_right(u) for u in aligned]
    aligned_web_kept = [any(c["source"] in ("web", "inherited_web") and c["kept"] for c in kept[u]["candidates"])
                        if u in kept else False for u in aligned]

    kinds = {}
    for kind, rows in down.groupby("kind"):
        web_kept = [u in kept and any(c["source"] == "web" and c["kept"] for c in kept[u]["candidates"])
                    for u in rows.index]
        kinds[kind] = {"downloaded": len(rows), "image_kept": round(sum(u in kept for u in rows.index) / len(rows), 4),
                       "web_caption_kept": round(sum(web_kept) / len(rows), 4),
                       "leaves_right": round(sum(leaves_right(u) for u in rows.index) / len(rows), 4)}

    synthetic = table(out / "stages" / "caption" / "data", ["uid", "synthetic_captions"])
    sampled = [_right(t, scene[r["uid"]]) for r in synthetic for t in r["synthetic_captions"]]
    kept_synthetic = [_right(c["text"], scene[uid]) for uid, c in pairs if c["source"] == "synthetic"]
    wrong_primary = collections.Counter(
        f"{_source(r, r['caption_primary'])}: {_what_differs(parse(r['caption_primary']), scene[r['uid']])}"
        for r, wrong in zip(curated, wrong_after) if wrong)
    primary_synthetic = sum(_source(r, r["caption_primary"]) != "web" for r in curated) / max(1, len(curated))

    # Duplicates. Recall: planted copies (same picture re-encoded or resized) whose pair reached dedup and
    # left as one row. Precision: a drop is right when the row shows the same scene as its survivor; two
    # rows of one scene are the same picture up to a pixel or two of jitter, often byte for byte.
    dropped = [r for r in rejects if r["stage"] == "dedup"]
    same_scene = [scene[r["uid"]] == scene[r["duplicate_of"]] for r in dropped]
    planted_drops = sum(truth.group[r["uid"]] == truth.group[r["duplicate_of"]] for r in dropped)
    planted = [(u, truth.duplicate_of[u]) for u in down.index[down.kind.isin(PLANTED_DUPLICATES)]
               if u in reached_dedup and truth.duplicate_of[u] in reached_dedup]
    collapsed = sum(not (a in kept and b in kept) for a, b in planted)

    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return {
        "input": counts["input"], "downloaded": len(down), "curated": len(curated), "rejected": len(rejects),
        "noise_before": round(noisy_before, 4),
        "noise_after": round(sum(wrong_after) / max(1, len(curated)), 4),
        "pair_noise_after": round(sum(wrong_pairs) / max(1, len(pairs)), 4),
        "kept_pairs": len(pairs),
        "clean_kept": round(sum(clean_kept) / max(1, len(clean_kept)), 4),
        "aligned_web_caption_kept": round(sum(aligned_web_kept) / max(1, len(aligned_web_kept)), 4),
        "kinds": kinds,
        "synthetic_exact_sampled": round(sum(sampled) / len(sampled), 4) if sampled else None,
        "synthetic_exact_kept": round(sum(kept_synthetic) / len(kept_synthetic), 4) if kept_synthetic else None,
        "primary_is_synthetic": round(primary_synthetic, 4),
        "wrong_primary": dict(wrong_primary.most_common()),
        "dedup": {"dropped": len(dropped), "precision": round(sum(same_scene) / max(1, len(dropped)), 4),
                  "dropped_for_a_planted_copy": planted_drops,
                  "dropped_for_an_unplanted_row_of_its_scene": sum(same_scene) - planted_drops,
                  "dropped_for_another_scene": len(dropped) - sum(same_scene),
                  "dropped_for_another_scene_by_reason": dict(collections.Counter(
                      r["reason"] for r, same in zip(dropped, same_scene) if not same)),
                  "planted_pairs_reaching_dedup": len(planted),
                  "recall": round(collapsed / max(1, len(planted)), 4)},
    }


# --- downstream ------------------------------------------------------------------------------------

def _decode(jpeg: bytes):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def arm_data(runs: dict[str, Path], truth, seed: int) -> dict[str, tuple]:
    """(images uint8 N x H x W x 3, one caption per image) for each arm, as an export would give them."""
    import numpy as np
    import pyarrow.dataset as ds

    from capfilt.world.captions import N_PHRASINGS, describe
    rng = np.random.default_rng(seed)
    # Sorted by uid: the download stage writes rows in the order its threads finish, and the order
    # sets the batches, so without it a rerun trains on other batches.
    downloaded = ds.dataset(runs[FIRST] / "stages" / "download" / "data").to_table(
        columns=["uid", "caption", "image"]).sort_by("uid").to_pylist()
    images = np.stack([_decode(r["image"]) for r in downloaded])
    data = {"raw": (images, [r["caption"] for r in downloaded]),  # trained with --raw
            "oracle": (images, [describe(truth.scene_obj[r["uid"]], int(rng.integers(N_PHRASINGS)))
                                for r in downloaded])}
    for arm, run in runs.items():
        rows = ds.dataset(run / "curated").to_table(columns=["uid", "image", "caption_primary"]).sort_by(
            "uid").to_pylist()
        data[arm] = (np.stack([_decode(r["image"]) for r in rows]), [r["caption_primary"] for r in rows])
    return data


def retrieval_data(n: int):
    from capfilt.lab.data import annotated
    from capfilt.world.captions import N_PHRASINGS
    held_out = annotated(n, RETRIEVAL_SEED)
    return held_out.images, [caps[i % N_PHRASINGS] for i, caps in enumerate(held_out.captions)], \
        [s.to_json() for s in held_out.scenes]


def train_and_measure(task: tuple) -> dict:
    """One fresh CLIP on one arm for one seed (runs in a worker process, one torch thread)."""
    arm, seed, steps, batch, lr, data_file = task
    import tempfile

    import numpy as np
    import open_clip
    import torch
    from transformers import PreTrainedTokenizerFast

    from capfilt.lab.common import seed_everything
    from capfilt.lab.metrics import hits_at_1
    from capfilt.lab.tokens import save_clip_tokenizer
    from capfilt.lab.train_clip import MEAN, STD, fit, model_config

    torch.set_num_threads(1)
    with np.load(data_file, allow_pickle=False) as f:
        images, captions = f[f"{arm}_images"], [str(c) for c in f[f"{arm}_captions"]]
        eval_images, eval_texts, eval_keys = f["eval_images"], [str(t) for t in f["eval_texts"]], f["eval_keys"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = save_clip_tokenizer(Path(tmp), context_length=32, web=True)  # no arm's words are [UNK]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp)

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=32,
                         return_tensors="pt").input_ids

    seed_everything(seed)
    model = open_clip.model.CLIP(**model_config(vocab))
    started = time.perf_counter()
    history, _ = fit(model, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [[c] for c in captions],
                     tokenize, steps=steps, batch=batch, lr=lr, seed=seed, log=lambda m: None)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(eval_images).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        image_features = torch.cat([model.encode_image(c, normalize=True) for c in x.split(500)]).numpy()
        text_features = model.encode_text(tokenize(eval_texts), normalize=True).numpy()
    result = {"arm": arm, "seed": seed, "train_images": len(images), "train_seconds": round(seconds, 1),
              "final_loss": history[-1]["loss"]}
    for pool in (100, 1000):
        hits = hits_at_1(image_features, text_features, eval_keys, pool)
        recall = {k: float(h.mean()) for k, h in hits.items()}
        result[f"r1_{pool}"] = round((recall["image_to_text"] + recall["text_to_image"]) / 2, 4)
        result[f"r1_{pool}_by_direction"] = {k: round(v, 4) for k, v in recall.items()}
        # per query, both directions averaged: a subset's R@1 (a concept's) is the mean over its queries
        result[f"hits_{pool}"] = ((hits["image_to_text"].astype(float) + hits["text_to_image"]) / 2).tolist()
    print(f"[quality] {arm:<12} seed {seed}: R@1/100 {result['r1_100']:.3f}, R@1/1000 {result['r1_1000']:.3f} "
          f"({len(images)} images, {seconds:.0f}s)", flush=True)
    return result


def training_args(ap: argparse.ArgumentParser, work: str) -> None:
    """The options of every bench that trains small CLIPs on curated pairs (this one, shaping.py, mixing.py)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per arm")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per model (the shared budget)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-n", type=int, default=2000, help="held-out pairs: pools of 100 and of 1000")
    ap.add_argument("--jobs", type=int, default=2, help="models trained at once (one torch thread each)")
    ap.add_argument("--work", default=work)
    ap.add_argument("--json", help="write the report here too")


def train_missing(tasks: dict[Path, tuple], jobs: int) -> None:
    """Train each task whose result file is missing (a rerun trains only those), `jobs` at once; each
    result is written to its file as it comes."""
    todo = [path for path in tasks if not path.exists()]
    if todo:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            for path, result in zip(todo, pool.map(train_and_measure, [tasks[p] for p in todo])):
                path.write_text(json.dumps(result) + "\n")


def summarise(results: list[dict], names) -> dict:
    import numpy as np
    summary = {}
    for arm in names:
        rows = [r for r in results if r["arm"] == arm]
        rows = sorted(rows, key=lambda r: r["seed"])
        summary[arm] = {f"r1_{p}": {"mean": round(float(np.mean([r[f"r1_{p}"] for r in rows])), 4),
                                    "std": round(float(np.std([r[f"r1_{p}"] for r in rows], ddof=1)), 4)
                                    if len(rows) > 1 else 0.0,
                                    "min": min(r[f"r1_{p}"] for r in rows), "max": max(r[f"r1_{p}"] for r in rows),
                                    "by_seed": [r[f"r1_{p}"] for r in rows]}
                        for p in (100, 1000)}
        summary[arm]["train_images"] = rows[0]["train_images"]
    return summary


# --- the plot (a hand-written SVG: no plotting dependency) ----------------------------------------------

def svg(report: dict) -> str:
    names = list(report["downstream"])
    bar, gap = 22, 6
    group_w = len(names) * (bar + gap) + 40
    left, top = 60, 40
    width, height = left + 2 * group_w + 20, 360
    palette = {"raw": "#b0b0b0", "oracle": "#5a9e5a"}
    blues = ["#2f6fba", "#7fa7d9", "#b8432f", "#e49a8c", "#6a3d9a", "#b9a2d6"]
    colours = {n: palette.get(n) or blues[i % len(blues)] for i, n in enumerate(x for x in names if x not in palette)}
    colours |= {n: palette[n] for n in palette if n in names}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="20" font-size="13">Held-out R@1, small CLIPs with one budget '
             f'({report["settings"]["steps"]} steps x {report["settings"]["batch"]}): mean and range of '
             f'{len(report["settings"]["seeds"])} seeds</text>']
    plot_h = height - top - 90

    def y(v):
        return top + plot_h * (1 - v)

    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    for g, pool in enumerate((100, 1000)):
        x0 = left + g * group_w + 20
        for i, arm in enumerate(names):
            stats = report["downstream"][arm][f"r1_{pool}"]
            x = x0 + i * (bar + gap)
            parts.append(f'<rect x="{x:.1f}" y="{y(stats["mean"]):.1f}" width="{bar}" '
                         f'height="{plot_h * stats["mean"]:.1f}" fill="{colours[arm]}"/>'
                         f'<line x1="{x + bar / 2:.1f}" x2="{x + bar / 2:.1f}" y1="{y(stats["min"]):.1f}" '
                         f'y2="{y(stats["max"]):.1f}" stroke="black" stroke-width="1.5"/>'
                         f'<text x="{x + bar / 2:.1f}" y="{y(stats["mean"]) - 6:.1f}" text-anchor="middle" '
                         f'font-size="9">{stats["mean"]:.3f}</text>')
        parts.append(f'<text x="{x0 + len(names) * (bar + gap) / 2:.1f}" y="{top + plot_h + 18}" '
                     f'text-anchor="middle" font-size="13">R@1 among {pool}</text>')
    for i, arm in enumerate(names):
        x, row = left + (i % 4) * 150, height - 42 + (i // 4) * 18
        parts.append(f'<rect x="{x}" y="{row}" width="12" height="12" fill="{colours[arm]}"/>'
                     f'<text x="{x + 18}" y="{row + 10}">{arm}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def goals(curation: dict, downstream: dict | None) -> list[dict]:
    """The goals of docs/quality.md, for each scorer's CapFilt run (and its filter-only arm)."""
    rows = []
    for scorer in SCORERS:
        if scorer not in curation:
            continue
        m = curation[scorer]
        checks = [("wrong primary captions <= 0.01", m["noise_after"], m["noise_after"] <= 0.01),
                  ("clean pairs kept >= 0.95", m["clean_kept"], m["clean_kept"] >= 0.95),
                  ("dedup precision >= 0.99", m["dedup"]["precision"], m["dedup"]["precision"] >= 0.99),
                  ("dedup recall >= 0.99", m["dedup"]["recall"], m["dedup"]["recall"] >= 0.99)]
        if downstream and scorer in downstream:
            gap = downstream["oracle"]["r1_1000"]["mean"] - downstream[scorer]["r1_1000"]["mean"]
            checks.append(("R@1/1000 within 0.01 of the oracle", round(-gap, 4), gap <= 0.01))
            only = f"{scorer}_filter_only"
            if only in downstream:
                leads = [a - b for a, b in zip(downstream[scorer]["r1_1000"]["by_seed"],
                                               downstream[only]["r1_1000"]["by_seed"])]
                checks.append(("CapFilt > filter-only R@1/1000, every seed", [round(v, 4) for v in leads],
                               min(leads) > 0))
        rows += [{"scorer": scorer, "goal": g, "measured": v, "met": bool(ok)} for g, v, ok in checks]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="rows in the web corpus")
    ap.add_argument("--noise", type=float, default=0.45, help="share of plain rows with a wrong caption")
    ap.add_argument("--runs", nargs="+", help="curate runs (default: every scorer, CapFilt and filter-only)")
    training_args(ap, "/tmp/capfilt-bench-quality")
    ap.add_argument("--svg", help="write the plot here")
    ap.add_argument("--skip-downstream", action="store_true", help="curation figures only")
    ap.add_argument("--raw", action="store_true", help="also train on the raw downloaded pairs")
    args = ap.parse_args()

    import numpy as np

    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve

    overrides = run_overrides()
    names = args.runs or list(overrides)
    if FIRST not in names:
        names.insert(0, FIRST)
    work = Path(args.work)
    corpus = work / f"world-{args.n}-{args.noise}"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=args.n, seed=CORPUS_SEED, noise=args.noise, slow_ms=200, overwrite=True)
    summary = json.loads((corpus / "corpus.json").read_text())
    print(f"[quality] corpus: {args.n} rows (seed {CORPUS_SEED}), noise {summary['noise_share']:.1%} of "
          f"{summary['image_rows']} image rows, {sum(summary['faults'].values())} fault rows -> {corpus}", flush=True)
    runs = {name: work / f"out-{args.n}-{args.noise}-{name}" for name in names}
    seconds, costs = {}, {}
    # One port and one metadata file for every invocation: a later invocation's runs reuse the first
    # run's download, which is checked against the input file (its URLs, size and modification time).
    port_file, metadata = work / "port", corpus / "metadata.parquet"
    with serve(corpus / "site", port=int(port_file.read_text()) if port_file.exists() else 0) as server:
        if not (port_file.exists() and metadata.exists()):
            port_file.write_text(str(server.port))
            metadata = write_metadata(corpus, server.base_url)
        for name in names:
            reuse = None if name == FIRST else (
                runs[FIRST], ["download"] if name.endswith("filter_only") else ["download", "caption"])
            seconds[name] = round(curate(metadata, runs[name], server.port, overrides[name], reuse), 1)
            filter_manifest = json.loads((runs[name] / "stages" / "filter" / "manifest.json").read_text())
            costs[name] = filter_manifest["models"].get("scoring")
    truth = load_truth(corpus)
    curation = {name: curation_metrics(run, truth) for name, run in runs.items()}
    report = {"corpus": summary, "runs": {n: overrides[n] for n in names}, "curate_seconds": seconds,
              "scoring_costs": costs, "curation": curation,
              "settings": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": args.seeds,
                           "eval_n": args.eval_n, "retrieval_seed": RETRIEVAL_SEED, "corpus_seed": CORPUS_SEED}}
    print(f"\n{'run':<20} {'curated':>7} {'noise before':>12} {'after':>6} {'pair noise':>10} {'clean kept':>10} "
          f"{'synth. exact':>12} {'dup prec.':>9} {'dup rec.':>8}")
    for name, m in curation.items():
        print(f"{name:<20} {m['curated']:>7} {m['noise_before']:>12.3f} {m['noise_after']:>6.3f} "
              f"{m['pair_noise_after']:>10.3f} {m['clean_kept']:>10.3f} {_fmt(m['synthetic_exact_kept']):>12} "
              f"{m['dedup']['precision']:>9.3f} {m['dedup']['recall']:>8.3f}")
    for name, cost in costs.items():
        print(f"scoring cost {name}: {cost}")
    for name in (n for n in SCORERS if n in curation):
        print(f"\nwrong primary captions ({name}), by source and what is wrong:",
              ", ".join(f"{k} {v}" for k, v in curation[name]["wrong_primary"].items()))

    downstream = None
    if not args.skip_downstream:
        # Each finished model's figures are kept under WORK/downstream: a rerun trains only what is missing.
        data_file, cache = work / "arms.npz", work / "downstream"
        cache.mkdir(exist_ok=True)
        tasks = {cache / f"{arm}-seed{seed}-{args.steps}x{args.batch}-lr{args.lr}-eval{args.eval_n}-web.json":
                 (arm, seed, args.steps, args.batch, args.lr, str(data_file))
                 for seed in args.seeds for arm in arms(runs, args.raw)}
        if not all(path.exists() for path in tasks):
            data = arm_data(runs, truth, seed=0)
            eval_images, eval_texts, eval_keys = retrieval_data(args.eval_n)
            np.savez(data_file, eval_images=eval_images, eval_texts=np.array(eval_texts),
                     eval_keys=np.array(eval_keys), **{f"{arm}_images": d[0] for arm, d in data.items()},
                     **{f"{arm}_captions": np.array(d[1]) for arm, d in data.items()})
            train_missing(tasks, args.jobs)
        results = [json.loads(path.read_text()) for path in tasks]
        report["downstream_runs"] = results
        downstream = report["downstream"] = summarise(results, arms(runs, args.raw))
        report["train_seconds_total"] = round(sum(r["train_seconds"] for r in results), 1)
        print(f"\n{'arm':<20} {'images':>6} {'R@1/100 mean (min-max)':>24} {'R@1/1000 mean (min-max)':>25}")
        for arm, s in downstream.items():
            a, b = s["r1_100"], s["r1_1000"]
            print(f"{arm:<20} {s['train_images']:>6} {a['mean']:>10.3f} ({a['min']:.3f}-{a['max']:.3f})"
                  f"{b['mean']:>13.3f} ({b['min']:.3f}-{b['max']:.3f})")
        if args.svg:
            Path(args.svg).write_text(svg(report))
    report["goals"] = goals(curation, downstream)
    print("\ngoals:")
    for g in report["goals"]:
        print(f"  {g['scorer']:<9} {g['goal']:<46} {str(g['measured']):>24}  {'met' if g['met'] else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
