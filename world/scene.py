"""Scenes of the shapes world and how they are drawn.

A scene is one or two coloured shapes on a plain background; with two, their left-to-right order
is part of the scene. Every image and caption of the world is made from a scene, which makes the
scene the ground truth that tests and benchmarks compare against.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "gray", "black")

COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (135, 45, 185),
    "orange": (250, 135, 20),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}

# Layout on a 64-pixel grid (scaled for other sizes). With two objects each owns one half of the
# image; the largest radius plus the largest jitter keeps it inside its half, so left/right is
# never ambiguous. Small radii are at most half the large ones (area ratio >= 4).
_RADII = {"small": (5, 6), "large": (12, 13)}
_TWO_OBJECT_CENTRES_X = (16, 48)
_JITTER_X = {1: 8, 2: 2}
_JITTER_Y = 8
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing for crisp small shapes


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str

    def __post_init__(self) -> None:
        for value, allowed in ((self.colour, COLOURS), (self.shape, SHAPES), (self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # left to right
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))  # lists in, hashable tuple kept
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"{self.background!r} is not one of {BACKGROUNDS}")

    def to_dict(self) -> dict:
        return {
            "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in self.objects],
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(SceneObject(o["colour"], o["shape"], o["size"]) for o in d["objects"])
        return cls(objects, d["background"])

    def to_json(self) -> str:
        """Canonical JSON: equal scenes give equal strings, so the text itself can be compared."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator) -> SceneObject:
    return SceneObject(_pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, SIZES))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene; two objects (60%) are always distinct, so their order is observable."""
    background = _pick(rng, BACKGROUNDS)
    if rng.random() < 0.4:
        return Scene((_sample_object(rng),), background)
    left = _sample_object(rng)
    right = _sample_object(rng)
    while right == left:
        right = _sample_object(rng)
    return Scene((left, right), background)


def change_one_attribute(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with exactly one attribute changed: a colour, shape, size, the order or the
    background. The result always differs from the input."""
    edits = [(i, field) for i in range(len(scene.objects)) for field in ("colour", "shape", "size")]
    edits.append((None, "background"))
    if len(scene.objects) == 2 and scene.objects[0] != scene.objects[1]:
        edits.append((None, "order"))
    index, field = edits[int(rng.integers(len(edits)))]
    if field == "order":
        return Scene(scene.objects[::-1], scene.background)
    if field == "background":
        others = tuple(b for b in BACKGROUNDS if b != scene.background)
        return Scene(scene.objects, _pick(rng, others))
    options = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[field]
    old = scene.objects[index]
    new_value = _pick(rng, tuple(v for v in options if v != getattr(old, field)))
    values = {"colour": old.colour, "shape": old.shape, "size": old.size, field: new_value}
    objects = list(scene.objects)
    objects[index] = SceneObject(**values)
    return Scene(tuple(objects), scene.background)


def attribute_differences(a: Scene, b: Scene) -> int:
    """How many single attributes separate two scenes (a swapped order counts as one); scenes with
    different object counts are len(objects) * 3 + 1 apart, more than any same-count pair."""
    if len(a.objects) != len(b.objects):
        return 3 * max(len(a.objects), len(b.objects)) + 1
    if len(a.objects) == 2 and a.objects == b.objects[::-1] and a.objects[0] != a.objects[1]:
        return int(a.background != b.background) + 1
    per_object = sum(getattr(x, f) != getattr(y, f) for x, y in zip(a.objects, b.objects)
                     for f in ("colour", "shape", "size"))
    return per_object + int(a.background != b.background)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # about the circle's area, so shape is not confused with size
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        t = 0.35 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene as an RGB image of size x size. With rng, positions and radii jitter a
    little (never across the middle, never blurring small vs large); without, the layout is fixed."""
    scale = size * _SUPERSAMPLE / 64
    canvas = Image.new("RGB", (size * _SUPERSAMPLE,) * 2, BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(canvas)
    n = len(scene.objects)
    for slot, obj in enumerate(scene.objects):
        cx = 32 if n == 1 else _TWO_OBJECT_CENTRES_X[slot]
        cy = 32
        low, high = _RADII[obj.size]
        r = high
        if rng is not None:
            cx += int(rng.integers(-_JITTER_X[n], _JITTER_X[n] + 1))
            cy += int(rng.integers(-_JITTER_Y, _JITTER_Y + 1))
            r = int(rng.integers(low, high + 1))
        _draw_shape(draw, obj.shape, cx * scale, cy * scale, r * scale, COLOUR_RGB[obj.colour])
    return canvas.reduce(_SUPERSAMPLE)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes; 4:4:4 chroma keeps the thin coloured shapes from bleeding. Deterministic."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
