"""Captioning loops side by side in one run (not a timed test): today's loop vs capfilt's, same model,
same images, same seeds, one process, the same torch threads.

CoCa (open_clip): the loop capfilt ran before (`_coca_decode_full`: open_clip's CoCa.generate top-p
loop, the whole prefix through both text stacks at every token, ended rows kept) vs the cached loop
(`_coca_decode_cached`: one new token per step, each layer's keys and values kept, ended rows out).
BLIP (transformers): `BlipTextLMHeadModel.generate` (cached, ended rows kept and padded) vs capfilt's
loop (the same cache, ended rows out). Random weights where no checkpoint of that size can be had
here: speed does not depend on the weights, though with random weights rows rarely end (so the gain
of dropping ended rows shows only on a trained model, the shapes BLIP).

For each model it prints: seconds of each loop, the ratio, tokens/s of each (tokens sampled up to and
including the end token), captions identical between the loops (same seeds), and, for every caption
that differs, the step where it first differs and how far apart the two loops' logits were there.

`sampler` times one sampling step alone: the sort of the whole vocabulary before vs now.

    .venv/bin/python bench/captioning.py [--which coca-b32,coca-l14,blip-shapes,blip-base,sampler]
                                         [--images 8] [--large-images 2] [--captions 5] [--tokens 30]
                                         [--threads 1] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Recorder:
    """A sampler wrapper that keeps each row's logits per step (to trace a difference to its logits)."""

    def __init__(self, sampler, keep: bool):
        self.sampler, self.keep, self.logits = sampler, keep, {}

    def __call__(self, logits, rows=None, generated=None):
        if self.keep:
            step = generated.shape[1] - 1
            for i, r in enumerate(range(len(logits)) if rows is None else rows):
                self.logits[(step, r)] = logits[i].float().clone()
        return self.sampler(logits, rows, generated)


def trimmed(row: list[int], end: int, pad: int) -> list[int]:
    """A row up to and including its end token; without one, without the trailing pads."""
    if end in row:
        return row[:row.index(end) + 1]
    while row and row[-1] == pad:
        row = row[:-1]
    return row


def compare(name: str, captioner, pixels, old, new, k: int, tokens: int, repeats: int) -> dict:
    """Time both loops (alternating, `repeats` each, after one warm-up), count identical captions and
    trace each difference to the logits of its first differing step."""
    import numpy as np

    from capfilt.udfs.models.captioner import _NucleusSampler
    end, pad = captioner.special["end"], captioner.special["pad"]

    def run(fn, keep=False):
        streams = [np.random.default_rng([i, j]) for i in range(pixels.shape[0]) for j in range(k)]
        sampler = Recorder(_NucleusSampler(streams, 0.9, 1.0, end=end), keep)
        start = time.perf_counter()
        rows = fn(captioner, pixels, k, sampler, tokens)
        return [trimmed(row, end, pad) for row in rows], time.perf_counter() - start, sampler

    run(old), run(new)  # warm-up
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for side, fn in (("old", old), ("new", new)):
            times[side].append(run(fn)[1])
    a, _, ra = run(old, keep=True)
    b, _, rb = run(new, keep=True)
    same = sum(x == y for x, y in zip(a, b))
    traced = []
    for row, (x, y) in enumerate(zip(a, b)):
        if x != y:
            step = next(i for i in range(min(len(x), len(y)) + 1) if i == min(len(x), len(y)) or x[i] != y[i]) - 1
            gap = (ra.logits[(step, row)] - rb.logits[(step, row)]).abs().max().item()
            traced.append((row, step, gap))
    old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
    result = {"model": name, "rows": len(a), "old_s": old_s, "new_s": new_s, "ratio": old_s / new_s,
              "old_tokens_per_s": sum(len(x) - 1 for x in a) / old_s,
              "new_tokens_per_s": sum(len(y) - 1 for y in b) / new_s,
              "identical": same, "differences": traced}
    print(f"{name}: {pixels.shape[0]} images x {k} captions, {tokens} new tokens: today's loop {old_s:.2f} s, "
          f"new {new_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times['old'])} vs "
          f"{', '.join(f'{t:.2f}' for t in times['new'])}) -> ratio {result['ratio']:.2f}; tokens/s "
          f"{result['old_tokens_per_s']:.0f} -> {result['new_tokens_per_s']:.0f}; identical captions "
          f"{same}/{len(a)}", flush=True)
    for row, step, gap in traced:
        print(f"  row {row} first differs at step {step}: logits of the two loops there within {gap:.2e}")
    return result


def sampler_speed(repeats: int, rows: int = 320, vocab: int = 49408) -> None:
    """One sampling step over CoCa's vocabulary (320 rows: 64 images x 5 captions): the sampler
    before (softmax, then a sort of the whole vocabulary) vs now (the top 256 sorted, the whole row
    only when those fall short of top_p), on flat logits (random weights: the nucleus is most of the
    vocabulary) and peaked ones (a trained model's: a few tokens), same draws."""
    import numpy as np
    import torch

    from capfilt.udfs.models.captioner import _nucleus_pick, _NucleusSampler
    torch.manual_seed(0)
    for label, scale in (("flat", 1.0), ("peaked", 8.0)):
        logits = torch.randn(rows, vocab) * scale

        def before():  # the sampler as it was, step for step
            streams = [np.random.default_rng(i) for i in range(rows)]
            u = torch.tensor([stream.random() for stream in streams], dtype=torch.float64)
            probs = torch.softmax(logits.double() / 1.0, dim=-1).cpu()
            return _nucleus_pick(*probs.sort(dim=-1, descending=True), u, 0.9)

        def now():
            return _NucleusSampler([np.random.default_rng(i) for i in range(rows)], 0.9, 1.0)(logits)

        times = {"before": [], "now": []}
        for _ in range(repeats + 1):
            for side, fn in (("before", before), ("now", now)):
                start = time.perf_counter()
                picked = fn()
                times[side].append(time.perf_counter() - start)
                if side == "before":
                    expected = picked
            assert torch.equal(picked, expected), "the sampler must pick what a full sort picks"
        old_s, new_s = statistics.median(times["before"][1:]), statistics.median(times["now"][1:])
        print(f"sampler, {label} logits, {rows} rows x {vocab} tokens: full sort {old_s * 1000:.0f} ms, now "
              f"{new_s * 1000:.0f} ms per step -> ratio {old_s / new_s:.2f}; same tokens", flush=True)


def coca(name: str, images: int):
    import open_clip
    import torch

    from capfilt.udfs.models.captioner import Captioner
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer(name)
    captioner = Captioner(name, "coca", model, None, tokenizer, "cpu", "fp32",
                          lambda ids: open_clip.decode(torch.tensor(ids)),
                          {"start": tokenizer.sot_token_id, "end": tokenizer.eot_token_id, "pad": 0})
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return captioner, torch.randn(images, 3, size, size)


def blip(ref: str, images: int):
    import numpy as np

    from capfilt.udfs.models import load_captioner
    from capfilt.world.scene import render, sample_scene
    captioner = load_captioner(ref, device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    return captioner, captioner.preprocess([render(sample_scene(rng)) for _ in range(images)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", default="coca-b32,coca-l14,blip-shapes,blip-base,sampler")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--large-images", type=int, default=2, help="images for the ViT-L-14-size CoCa")
    ap.add_argument("--shapes-images", type=int, default=64, help="images for the shapes BLIP")
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from capfilt.udfs.models import SHAPES_CAPTIONER
    from capfilt.udfs.models.blip import _blip_decode_cached, _blip_decode_generate
    from capfilt.udfs.models.coca import _coca_decode_cached, _coca_decode_full
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    coca_loops, blip_loops = (_coca_decode_full, _coca_decode_cached), (_blip_decode_generate, _blip_decode_cached)
    for which in args.which.split(","):
        if which == "coca-b32":
            captioner, pixels = coca("coca_ViT-B-32", args.images)
            compare("CoCa ViT-B-32 size (random weights)", captioner, pixels, *coca_loops, args.captions,
                    args.tokens, args.repeats)
        elif which == "coca-l14":
            captioner, pixels = coca("coca_ViT-L-14", args.large_images)
            compare("CoCa ViT-L-14 size (random weights)", captioner, pixels, *coca_loops, args.captions,
                    args.tokens, 1)
        elif which == "blip-shapes":
            captioner, pixels = blip(SHAPES_CAPTIONER, args.shapes_images)
            compare("BLIP, shapes captioner (trained)", captioner, pixels, *blip_loops, args.captions,
                    args.tokens, args.repeats)
        elif which == "blip-base":
            from bench.capfilt import random_blip_base
            with tempfile.TemporaryDirectory() as work:
                captioner, pixels = blip(random_blip_base(Path(work) / "blip-base"), args.images)
                compare("BLIP-base size (random weights, shapes tokenizer)", captioner, pixels, *blip_loops,
                        args.captions, args.tokens, args.repeats)
        elif which == "sampler":
            sampler_speed(args.repeats)
        else:
            raise SystemExit(f"unknown --which {which!r}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
