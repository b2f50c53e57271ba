"""How fast the shapes world renders and encodes images, and generates a web corpus, on one core.

    python bench/world_speed.py [--n 5000] [--corpus-n 2000]

Prints e.g. "render+encode: 5400 images/s (64x64, JPEG q90, one core)". The target is >= 2,000/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

import numpy as np  # noqa: E402

from capfilt.world.corpus import make_web_corpus  # noqa: E402
from capfilt.world.scene import encode_jpeg, render, sample_scene  # noqa: E402


def render_encode_rate(n: int, seed: int = 0) -> float:
    """Images per second for render (with jitter) + JPEG encode; scene sampling is not timed."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    start = time.perf_counter()
    for scene in scenes:
        encode_jpeg(render(scene, 64, rng), 90)
    return n / (time.perf_counter() - start)


def corpus_rate(n: int, seed: int = 0) -> float:
    """Rows per second for make_web_corpus, files and sidecar included."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_web_corpus(tmp, n, seed)
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="images to render and encode")
    parser.add_argument("--corpus-n", type=int, default=0, help="also time a web corpus of this many rows")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # measure one core, as promised
    render_encode_rate(min(args.n, 200))  # warm-up: imports, allocator, JPEG tables
    print(f"render+encode: {render_encode_rate(args.n):.0f} images/s (64x64, JPEG q90, one core)")
    if args.corpus_n:
        print(f"web corpus: {corpus_rate(args.corpus_n):.0f} rows/s (n={args.corpus_n}, files and sidecar)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
