"""Shapes-world data in memory for training and evaluation: images as uint8 arrays, captions,
scenes. Training uses the clean annotated split (`make_annotated`); evaluation uses held-out seeds
of the annotated split and of the noisy web corpus (`make_web_corpus`), so the filter is measured
on exactly the caption noise the pipeline meets."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from capfilt.world.captions import N_PHRASINGS, describe, web_phrasing
from capfilt.world.corpus import make_annotated, make_web_corpus
from capfilt.world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, change_one_attribute

# Held-out seeds: training uses seeds below EVAL_SEED_BASE, evaluation seeds from it up.
EVAL_SEED_BASE = 10_000


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@dataclass
class Annotated:
    images: np.ndarray            # (n, H, W, 3) uint8, decoded from the split's JPEG bytes
    captions: list[list[str]]     # N_PHRASINGS clean captions per image
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


def annotated(n: int, seed: int, image_size: int = 64) -> Annotated:
    """The clean annotated split of n images for seed (as `make_annotated` writes it), in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        table = pq.read_table(make_annotated(tmp, n, seed, image_size=image_size))
    images = np.stack([decode(b) for b in table.column("image").to_pylist()])
    captions = table.column("captions").to_pylist()
    scenes = [Scene.from_json(s) for s in table.column("scene").to_pylist()]
    return Annotated(images, captions, scenes)


def wrong_attribute_captions(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    """For each scene a clean caption (random phrasing) of the scene with one attribute changed:
    the hard negatives the filter must rank below the truth."""
    return [describe(change_one_attribute(s, rng), int(rng.integers(N_PHRASINGS))) for s in scenes]


ATTRIBUTES = ("colour", "shape", "size", "order", "background")


def with_attribute_changed(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """The scene with exactly `attribute` changed (for colour, shape and size: of one object drawn at
    random). `order` needs two different objects."""
    if attribute == "order":
        if len(scene.objects) != 2 or scene.objects[0] == scene.objects[1]:
            raise ValueError("order needs two different objects")
        return Scene(scene.objects[::-1], scene.background)
    if attribute == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return Scene(scene.objects, others[int(rng.integers(len(others)))])
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    options = [v for v in values if v != getattr(objects[i], attribute)]
    objects[i] = replace(objects[i], **{attribute: options[int(rng.integers(len(options)))]})
    return Scene(tuple(objects), scene.background)


def wrong_attribute_phrasings(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    """As `wrong_attribute_captions`, phrased in web style half of the time."""
    changed = [change_one_attribute(s, rng) for s in scenes]
    return [web_phrasing(s, rng) if rng.random() < 0.5 else describe(s, int(rng.integers(N_PHRASINGS)))
            for s in changed]


@dataclass
class WebEval:
    images: np.ndarray   # (n, H, W, 3) uint8
    captions: list[str]
    kinds: list[str]     # clean, web_phrasing, wrong_attribute, generic, spam, swapped
    scenes: list[Scene]


def web_corpus(n: int, seed: int) -> WebEval:
    """The plain rows (no faults, no odd image modes, no duplicates) of a noisy web corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        make_web_corpus(tmp, n, seed, duplicates=0.0, fault_rate=0.0, faults=(), variants=())
        truth = pq.read_table(Path(tmp) / "truth.parquet").to_pylist()
        images = np.stack([decode((Path(tmp) / "site" / row["file"]).read_bytes()) for row in truth])
    return WebEval(images, [row["caption"].decode("utf-8") for row in truth], [row["kind"] for row in truth],
                   [Scene.from_json(row["scene"]) for row in truth])
