"""Bootstrapping from little annotation, measured against the shapes world's ground truth (issue 35; not a
timed test; docs/quality.md).

Round 1: a captioner of the shapes captioner's architecture, initialised at random, fine-tuned on 500
annotated images (`lab finetune`); an ITM whose vision and text layers start from that captioner (as the
shapes ITM starts from the shapes captioner), fine-tuned on the same 500. Round 2: both fine-tuned further on
round 1's curated output of the held-out 10,000-row web corpus plus the 500 (the rejected candidates are the
ITM's hard negatives). Today: the committed shapes models, trained on 20,000 annotated scenes.

Each arm curates the corpus with its captioner and ITM (`filter.scorer=itm`, the ITM's match probability
>= 0.5, the fair web CLIP for the embedding) and is measured: ITM per-attribute AUC and the captioner's
exact-caption rate on held-out seed 10,000 (`lab eval`), noise after curation and clean pairs kept
(bench/quality.py's join with the truth). Goal: round 2 closes at least half of round 1's gap to today's
models on noise after curation.

    .venv/bin/python bench/bootstrap.py [--annotated 500] [--steps 600] [--work /tmp/capfilt-bench-bootstrap]
        [--quality-work /tmp/capfilt-bench-quality] [--json docs/bootstrap.json]

Everything under --work that is finished (a model folder, a committed curate output) is reused by a rerun.
The corpus and its committed download come from bench/quality.py's --work when it has them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: the corpus, curate runs and the join with the truth)

ANNOTATED_SEED = 5_000  # below 10,000 (training seeds) and not the shapes models' seed 0


def random_captioner(folder: Path) -> None:
    """The shapes captioner's architecture and token set, weights drawn at random (lab's initialisation)."""
    import torch
    from transformers import BlipForConditionalGeneration

    from capfilt.lab.tokens import save_blip_processor
    from capfilt.lab.train_captioner import IMAGE_SIZE, MEAN, STD, blip_config
    partial = folder.with_name(folder.name + ".partial")
    torch.manual_seed(0)
    tokenizer = save_blip_processor(partial, IMAGE_SIZE, MEAN, STD).tokenizer
    BlipForConditionalGeneration(blip_config(tokenizer)).save_pretrained(str(partial), safe_serialization=True)
    partial.rename(folder)


def itm_from_captioner(folder: Path, captioner: Path) -> None:
    """An ITM of the shapes ITM's architecture and token set (web words included) whose vision tower and
    text layers are `captioner`'s, its ITM head at random (lab/train_itm.py's initialisation)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor

    from capfilt.lab.tokens import save_blip_processor, web_words
    from capfilt.lab.train_itm import init_from_captioner, itm_config
    partial = folder.with_name(folder.name + ".partial")
    torch.manual_seed(0)
    source = BlipForConditionalGeneration.from_pretrained(str(captioner), torch_dtype=torch.float32)
    images = BlipImageProcessor.from_pretrained(str(captioner))
    words, marks = web_words()
    tokenizer = save_blip_processor(partial, images.size["height"], images.image_mean, images.image_std,
                                    extra=words + marks).tokenizer
    model = BlipForImageTextRetrieval(itm_config(source.config, len(tokenizer)))
    init_from_captioner(model, source)
    model.save_pretrained(str(partial), safe_serialization=True)
    partial.rename(folder)


def finetune(kind: str, init: Path, data: list[Path], out: Path, steps: int, lr: float, batch: int) -> dict:
    if not (out / "model_card.json").exists():
        cmd = [sys.executable, "-m", "capfilt.lab", "finetune", kind, "--init", str(init), "--out", str(out),
               "--steps", str(steps), "--lr", str(lr), "--batch", str(batch), "--heldout", "200",
               *[a for d in data for a in ("--data", str(d))]]
        started = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            raise SystemExit(f"finetune failed: {' '.join(cmd)}\n{proc.stdout[-4000:]}")
        print(f"[bootstrap] finetune {kind} -> {out}: {time.time() - started:.0f}s", flush=True)
    return json.loads((out / "model_card.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="rows in the web corpus")
    ap.add_argument("--annotated", type=int, default=500, help="annotated images of round 1")
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps per model and round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", default="/tmp/capfilt-bench-bootstrap")
    ap.add_argument("--quality-work", default="/tmp/capfilt-bench-quality",
                    help="bench/quality.py's --work: its corpus and committed download are reused")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()

    from capfilt.lab.cli import evaluate
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_ITM
    from capfilt.world.corpus import make_annotated, make_web_corpus, write_metadata
    from capfilt.world.server import serve

    work, qwork = Path(args.work), Path(args.quality_work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = qwork / f"world-{args.n}-0.45"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=args.n, seed=quality.CORPUS_SEED, noise=0.45, slow_ms=200, overwrite=True)
    annotated = work / f"annotated-{args.annotated}"
    if not (annotated / "annotated.parquet").exists():
        make_annotated(str(annotated), args.annotated, ANNOTATED_SEED)
    pairs = annotated / "annotated.parquet"

    m = work / "models"
    started = time.time()
    if not (m / "random-captioner").exists():
        random_captioner(m / "random-captioner")
    cards = {"r1_captioner": finetune("captioner", m / "random-captioner", [pairs], m / "r1-captioner",
                                      args.steps, 1e-3, args.batch)}
    if not (m / "r1-itm-init").exists():
        itm_from_captioner(m / "r1-itm-init", m / "r1-captioner")
    cards["r1_itm"] = finetune("itm", m / "r1-itm-init", [pairs], m / "r1-itm", args.steps, 5e-4, args.batch)

    clip = quality.run_overrides()["itm"]
    arms = {"today": (SHAPES_CAPTIONER, SHAPES_ITM), "round1": (m / "r1-captioner", m / "r1-itm"),
            "round2": (m / "r2-captioner", m / "r2-itm")}
    outs = {arm: work / f"out-{args.n}-{arm}" for arm in arms}
    seconds = {}
    port_file, metadata = qwork / "port", corpus / "metadata.parquet"
    download = qwork / f"out-{args.n}-0.45-{quality.FIRST}"
    with serve(corpus / "site", port=int(port_file.read_text()) if port_file.exists() else 0) as server:
        if not (port_file.exists() and metadata.exists()):
            port_file.write_text(str(server.port))
            metadata = write_metadata(corpus, server.base_url)
        reuse = (download, ["download"]) if (download / "stages" / "download" / "manifest.json").exists() else None
        for arm, (captioner, itm) in arms.items():
            if arm == "round2":
                cards["r2_captioner"] = finetune("captioner", m / "r1-captioner", [outs["round1"], pairs],
                                                 m / "r2-captioner", args.steps, 2e-4, args.batch)
                cards["r2_itm"] = finetune("itm", m / "r1-itm", [outs["round1"], pairs], m / "r2-itm",
                                           args.steps, 2e-4, args.batch)
            overrides = [o for o in clip if not o.startswith("filter.itm_")] + [
                f"caption.model={captioner}", f"filter.itm_model={itm}", "filter.itm_threshold=0.5"]
            seconds[arm] = round(quality.curate(metadata, outs[arm], server.port, overrides, reuse), 1)
            reuse = (outs[arm], ["download"])
    truth = quality.load_truth(corpus)
    report = {"annotated": {"n": args.annotated, "seed": ANNOTATED_SEED}, "steps": args.steps, "batch": args.batch,
              "curate_seconds": seconds, "arms": {}}
    for arm, (captioner, itm) in arms.items():
        figures = evaluate(captioner_ref=str(captioner), itm_ref=str(itm), n_web=2000, n_pairs=1000, n_captions=500)
        curation = quality.curation_metrics(outs[arm], truth)
        report["arms"][arm] = {
            "captioner": str(captioner), "itm": str(itm),
            "itm_attribute_auc": figures["itm"]["attribute_auc"], "itm_auc_clean_vs_noisy": figures["itm"]["auc_clean_vs_noisy"],
            "captioner_exact": figures["captioner"]["exact_rate"],
            "noise_after": curation["noise_after"], "clean_kept": curation["clean_kept"],
            "curated": curation["curated"]}
    r = {arm: report["arms"][arm]["noise_after"] for arm in arms}
    gap = r["round1"] - r["today"]
    report["gap_closed"] = round((r["round1"] - r["round2"]) / gap, 3) if gap > 0 else None
    report["goal"] = {"goal": "round 2 closes >= half of round 1's gap to today on noise after curation",
                      "met": report["gap_closed"] is not None and report["gap_closed"] >= 0.5}
    report["finetune_cards"] = {k: {"trained_steps": c["finetuned"]["trained_steps"],
                                    "train_seconds": c["finetuned"]["train_seconds"],
                                    "heldout": c["metrics"]["heldout"]} for k, c in cards.items()}
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps({k: report[k] for k in ("arms", "gap_closed", "goal")}, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
