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
from PIL import Image, ImageDraw, ImageFont

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


CONCEPTS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)  # 24 colour x shape concepts


def concept_ranking(exponent: float, seed: int) -> list[tuple[str, str, float]]:
    """A skewed world's concepts, most frequent first: [(colour, shape, probability)], Zipf's law over a
    seeded order of the 24 colour x shape concepts (P(rank r) ~ r^-exponent; 0: uniform)."""
    order = np.random.default_rng([seed, 24]).permutation(len(CONCEPTS))
    weights = np.arange(1, len(CONCEPTS) + 1, dtype=np.float64) ** -float(exponent)
    weights /= weights.sum()
    return [(*CONCEPTS[i], float(w)) for i, w in zip(order, weights)]


def concept_weights(ranking: list[tuple[str, str, float]] | None) -> np.ndarray | None:
    """The probability of each of CONCEPTS (in CONCEPTS' order) from a ranking; None: uniform draws."""
    if ranking is None:
        return None
    p = dict(((c, s), w) for c, s, w in ranking)
    return np.array([p[c] for c in CONCEPTS])


def _sample_object(rng: np.random.Generator, weights: np.ndarray | None = None) -> SceneObject:
    if weights is None:  # uniform: the draws every corpus made before skewed worlds existed
        return SceneObject(_pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, SIZES))
    colour, shape = CONCEPTS[int(rng.choice(len(CONCEPTS), p=weights))]
    return SceneObject(colour, shape, _pick(rng, SIZES))


def sample_scene(rng: np.random.Generator, weights: np.ndarray | None = None) -> Scene:
    """A random scene; two objects (60%) are always distinct, so their order is observable. `weights`: the
    probability of each colour x shape concept (concept_weights; None: uniform)."""
    background = _pick(rng, BACKGROUNDS)
    if rng.random() < 0.4:
        return Scene((_sample_object(rng, weights),), background)
    left = _sample_object(rng, weights)
    right = _sample_object(rng, weights)
    while right == left:
        right = _sample_object(rng, weights)
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


# --- watermarks: a translucent word or logo over the image, as stock-photo sites stamp previews ---

WATERMARK_TEXTS = ("(c) shapestock", "shapestock", "(c) pinboard", "clipart-free", "PREVIEW", "(c) myblog")
WATERMARK_INITIALS = ("S", "P", "C")
# text: one word across the image; logo: a badge (ring with an initial on a faint disc); tiled: the
# word repeated over the whole image on a tilted grid, as stock previews do.
WATERMARK_STYLES = ("text", "logo", "tiled")
# The ranges a watermark draws from (docs/world.md). Opacity is the alpha of the mark's strokes.
WATERMARK_OPACITY = (0.45, 0.75)
WATERMARK_WIDTH = {"text": (0.6, 0.95), "logo": (0.35, 0.6), "tiled": (0.35, 0.55)}  # share of the side
WATERMARK_ANGLE = 30.0  # words are tilted by up to this many degrees either way; logos are upright
_WATERMARK_SUPERSAMPLE_SIDE = 256  # small images' marks are drawn at >= this side, then box-downsampled


@dataclass(frozen=True)
class Watermark:
    """Where and how a watermark is drawn, in shares of the image's size (so a mark fits any size)."""
    style: str      # one of WATERMARK_STYLES
    text: str       # the word, or the logo's initial
    width: float    # share of the image width a word spans (tiled: one repetition), of the short side a logo
    x: float        # centre as shares of the width and height (tiled: the grid's offset in a cell)
    y: float
    angle: float    # degrees, counter-clockwise
    opacity: float  # alpha of the mark, 0..1
    tone: str       # "light" (white mark, dark edge) or "dark" (black mark, light edge)


def sample_watermark(rng: np.random.Generator, opacity: tuple[float, float] = WATERMARK_OPACITY) -> Watermark:
    """A random watermark: style, word, size, position (a word or logo stays mostly inside the
    image), tilt, opacity and tone. The number of draws does not depend on their values."""
    style = _pick(rng, WATERMARK_STYLES)
    words, initial = _pick(rng, WATERMARK_TEXTS), _pick(rng, WATERMARK_INITIALS)
    width = float(rng.uniform(*WATERMARK_WIDTH[style]))
    u, v, tilt = (float(t) for t in rng.random(3))
    alpha, tone = float(rng.uniform(*opacity)), _pick(rng, ("light", "dark"))
    if style == "logo":
        margin = width / 2
        return Watermark(style, initial, width, margin + u * (1 - 2 * margin), margin + v * (1 - 2 * margin), 0.0,
                         alpha, tone)
    x = width / 2 + u * (1 - width) if style == "text" else u
    y = 0.2 + v * 0.6 if style == "text" else v
    return Watermark(style, words, width, x, y, (2 * tilt - 1) * WATERMARK_ANGLE, alpha, tone)


def _tones(mark: Watermark) -> tuple[tuple, tuple]:
    light, dark = (255, 255, 255, 255), (0, 0, 0, 255)
    return (light, dark) if mark.tone == "light" else (dark, light)


def _word_layer(mark: Watermark, span: float) -> Image.Image:
    """The word, span pixels wide, tilted, on a transparent layer of its own size."""
    fill, edge = _tones(mark)
    reference = 100
    size = max(4, round(reference * span / max(1.0, ImageFont.load_default(size=reference).getlength(mark.text))))
    font = ImageFont.load_default(size=size)
    stroke = max(1, size // 12)
    left, top, right, bottom = font.getbbox(mark.text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((1 - left, 1 - top), mark.text, font=font, fill=fill, stroke_width=stroke,
                               stroke_fill=edge)
    return layer.rotate(mark.angle, resample=Image.Resampling.BICUBIC, expand=True)


def _watermark_layer(mark: Watermark, width: int, height: int) -> Image.Image:
    """The mark on a transparent width x height layer, at full opacity."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    if mark.style == "logo":
        fill, edge = _tones(mark)
        draw = ImageDraw.Draw(layer)
        cx, cy, r = mark.x * width, mark.y * height, mark.width * min(width, height) / 2
        ring = max(1.0, r * 0.16)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=edge[:3] + (90,), outline=edge,
                     width=max(1, round(ring * 1.5)))
        inner = ring * 0.25
        draw.ellipse([cx - r + inner, cy - r + inner, cx + r - inner, cy + r - inner], outline=fill,
                     width=max(1, round(ring)))
        font = ImageFont.load_default(size=max(4, round(r * 1.2)))
        draw.text((cx, cy), mark.text, font=font, fill=fill, anchor="mm", stroke_width=max(1, round(ring * 0.3)),
                  stroke_fill=edge)
        return layer
    span = mark.width * width
    word = _word_layer(mark, span)
    if mark.style == "text":
        layer.alpha_composite(word, (round(mark.x * width - word.width / 2), round(mark.y * height - word.height / 2)))
        return layer
    # tiled: rows of the word, each shifted by half a word, offset by (x, y) of one cell
    step_x, step_y = word.width + max(2, round(0.15 * span)), max(2, round(word.height * 1.6))
    pad = step_x + step_y  # the grid starts off the layer, so its edges are covered too
    grid = Image.new("RGBA", (width + 2 * pad, height + 2 * pad), (0, 0, 0, 0))
    for row, top in enumerate(range(round(mark.y * step_y), height + pad, step_y)):
        for left in range(round(mark.x * step_x) - (row % 2) * (step_x // 2) + step_x // 2, width + pad, step_x):
            grid.alpha_composite(word, (left, top))
    return grid.crop((pad, pad, pad + width, pad + height))


def draw_watermark(image: Image.Image, mark: Watermark) -> Image.Image:
    """The image (RGB) with the mark blended over it at the mark's opacity. Deterministic."""
    width, height = image.size
    factor = max(1, -(-_WATERMARK_SUPERSAMPLE_SIDE // max(width, height)))
    layer = _watermark_layer(mark, width * factor, height * factor)
    if factor > 1:
        layer = layer.reduce(factor)
    alpha = np.asarray(layer.getchannel("A"), dtype=np.float32) * (mark.opacity / 255)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    over = np.asarray(layer.convert("RGB"), dtype=np.float32)
    blended = base * (1 - alpha[..., None]) + over * alpha[..., None]
    return Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes; 4:4:4 chroma keeps the thin coloured shapes from bleeding. Deterministic."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
