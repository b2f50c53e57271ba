"""Which copies dedup's pixel confirmation passes, and which different pictures it tells apart (not a
timed test; docs/dedup.md).

Every image goes through the download stage's resizer first, as dedup sees it (`stored_form`).

    real photos   scikit-image's bundled pictures (in its wheel: skimage/data, no download), stored at
                  the default settings (256 px, border, JPEG 95). Copies of each: JPEG re-encodes,
                  resizes, crops (centred and from one side), combined. Different pictures: every pair.
    shapes world  stored at the demo's settings (64 px). Copies as the corpus plants them (resized
                  0.875-1.25x and/or re-encoded at JPEG 50-80), re-crops, another render of the same
                  scene (jitter), and the same scene with one object's shape changed.

For each pair it prints two measures:

    thumbs     capfilt.udfs.image_dedup.changed_share: the share of 32x32 thumbnail cells differing by
               more than pixel_tolerance (32) in some channel; a pair passes at <= pixel_max_changed
               (0.01 by default, 0.002 in the demo)
    residual   capfilt.udfs.decontaminate.copy_residual, both ways, the smaller: RMS (0-255) of the
               best placement of one image's scaled centre in the other (crop-tolerant)

    .venv/bin/python bench/dedup_confirm.py [--scenes 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from importlib import resources
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIMAGE_PICTURES = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
                    "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
                    "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png")


def skimage_picture(name: str) -> Image.Image:
    """One of scikit-image's bundled pictures, as RGB (read from the installed package's files)."""
    return Image.open(io.BytesIO((resources.files("skimage") / "data" / name).read_bytes())).convert("RGB")


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def scaled(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))),
                        Image.Resampling.BICUBIC)


def copies(image: Image.Image) -> dict[str, bytes]:
    """Named copies of a picture, encoded as a re-poster would."""
    out = {f"jpeg q{q}": jpeg(image, q) for q in (30, 50, 75)}
    out |= {f"resize {f}x, q75": jpeg(scaled(image, f), 75) for f in (0.5, 0.75, 1.5)}
    for c in (0.01, 0.02, 0.03, 0.05, 0.08, 0.10):
        out[f"crop {c:.0%} each side, q75"] = jpeg(crop(image, c, c, c, c), 75)
        out[f"crop {c:.0%} one side, q75"] = jpeg(crop(image, 0, 0, c, 0), 75)
    out["crop 3% each side, 0.6x, q60"] = jpeg(scaled(crop(image, .03, .03, .03, .03), 0.6), 60)
    return out


def measures(pairs, thumb_of, residual_thumb_of):
    """(changed_share, residual) per (a, b) pair of stored image bytes."""
    from capfilt.udfs.decontaminate import copy_residual
    from capfilt.udfs.image_dedup import changed_share
    a = np.stack([thumb_of(x) for x, _ in pairs])
    b = np.stack([thumb_of(y) for _, y in pairs])
    share = changed_share(a, b, 32)
    residual = np.array([min(copy_residual(residual_thumb_of(x), residual_thumb_of(y)),
                             copy_residual(residual_thumb_of(y), residual_thumb_of(x))) for x, y in pairs])
    return share, residual


def report(title: str, groups: dict[str, list], thumb_of, residual_thumb_of) -> None:
    print(f"\n{title}")
    print(f"{'pairs':<34} {'n':>4} | thumbs: {'min':>6} {'max':>6} <=.002 <=.01 | residual: {'min':>5} {'max':>5} <=6")
    for name, pairs in groups.items():
        share, residual = measures(pairs, thumb_of, residual_thumb_of)
        print(f"{name:<34} {len(pairs):>4} |         {share.min():6.4f} {share.max():6.4f} "
              f"{np.mean(share <= 0.002):5.2f} {np.mean(share <= 0.01):5.2f} |           "
              f"{residual.min():5.1f} {residual.max():5.1f} {np.mean(residual <= 6.0):4.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from functools import lru_cache

    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.net.fetch import stored_form
    from capfilt.pipelines.config import load_config
    from capfilt.udfs.decontaminate import thumbnail as residual_thumbnail
    from capfilt.udfs.image_dedup import thumbnail
    from capfilt.world.scene import SHAPES, Scene, SceneObject, encode_jpeg, render, sample_scene

    thumb_of = lru_cache(maxsize=None)(thumbnail)
    residual_thumb_of = lru_cache(maxsize=None)(residual_thumbnail)

    # Real photos, stored as the default download stores them.
    store = stored_form(load_config(None, []).download)

    def stored(data: bytes) -> bytes:
        image, *_rest, error = store(io.BytesIO(data))
        assert image is not None, error
        return image

    originals = {name: skimage_picture(name) for name in SKIMAGE_PICTURES}
    kept = {name: stored(jpeg(image, 95)) for name, image in originals.items()}
    groups: dict[str, list] = {}
    for name, image in originals.items():
        for kind, data in copies(image).items():
            groups.setdefault(kind, []).append((kept[name], stored(data)))
    groups["different pictures (all pairs)"] = [(kept[a], kept[b]) for a, b in combinations(kept, 2)]
    stereo = stored(jpeg(Image.open(io.BytesIO((resources.files("skimage") / "data" / "motorcycle_right.png")
                                               .read_bytes())).convert("RGB"), 95))
    groups["stereo pair (motorcycle l/r)"] = [(kept["motorcycle_left.png"], stereo)]
    report(f"Real photos: {len(originals)} scikit-image pictures, stored at 256 px (border, JPEG 95)",
           groups, thumb_of, residual_thumb_of)

    # The shapes world, stored as the demo stores it.
    store = stored_form(shapes_world_settings(load_config(None, [])).download)
    rng = np.random.default_rng(args.seed)
    groups = {}
    for _ in range(args.scenes):
        scene = sample_scene(rng)
        seed = int(rng.integers(1 << 30))
        image = render(scene, 64, np.random.default_rng(seed))
        original = stored(encode_jpeg(image, 90))
        factor = float(rng.choice([0.875, 1.125, 1.25]))
        quality = int(rng.choice([50, 60, 70, 80]))
        groups.setdefault("copy: re-encoded", []).append((original, stored(encode_jpeg(image, quality))))
        groups.setdefault("copy: resized + re-encoded", []).append(
            (original, stored(encode_jpeg(scaled(image, factor), quality))))
        for c in (0.03, 0.05, 0.08):
            groups.setdefault(f"copy: crop {c:.0%} each side", []).append(
                (original, stored(encode_jpeg(crop(image, c, c, c, c), quality))))
        again = render(scene, 64, np.random.default_rng(seed + 1))
        groups.setdefault("same scene, another render", []).append((original, stored(encode_jpeg(again, 90))))
        slot = int(rng.integers(len(scene.objects)))
        old = scene.objects[slot]
        objects = list(scene.objects)
        objects[slot] = SceneObject(old.colour, str(rng.choice([s for s in SHAPES if s != old.shape])), old.size)
        other = Scene(tuple(objects), scene.background)
        if len(set(other.objects)) == len(other.objects):
            groups.setdefault("another shape, same render seed", []).append(
                (original, stored(encode_jpeg(render(other, 64, np.random.default_rng(seed)), 90))))
            groups.setdefault("another shape, another render", []).append(
                (original, stored(encode_jpeg(render(other, 64, np.random.default_rng(seed + 1)), 90))))
    report(f"Shapes world: {args.scenes} scenes, stored at 64 px", groups, thumb_of, residual_thumb_of)


if __name__ == "__main__":
    main()
