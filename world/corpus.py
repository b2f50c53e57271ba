"""Corpora of the shapes world: a clean annotated split and a noisy LAION-style web corpus.

The annotated split stands in for COCO: images with several clean captions each. The web corpus
stands in for the web: image files for the server (out_dir/site), a ground-truth sidecar that only
tests and benchmarks read (out_dir/truth.parquet), a summary (out_dir/corpus.json), and, once the
server's address is known, the metadata the pipeline reads (write_metadata).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.world.captions import N_PHRASINGS, describe, parse, web_phrasing
from capfilt.world.evalset import EvalImage, modified_copy, read_eval_set
from capfilt.world.scene import (
    WATERMARK_OPACITY, Scene, Watermark, change_one_attribute, concept_ranking, concept_weights, draw_watermark,
    encode_jpeg, render, sample_scene,
    sample_watermark,
)

ALIGNED_KINDS = ("clean", "web_phrasing")
NOISE_KINDS = ("wrong_attribute", "generic", "spam", "swapped")
DUPLICATE_KINDS = ("duplicate_image", "near_duplicate_image", "near_duplicate_caption")
KINDS = ALIGNED_KINDS + NOISE_KINDS + DUPLICATE_KINDS + ("fault",)
FAULTS = (
    "http_404", "http_500_burst", "refused", "reset", "slow", "redirect", "redirect_loop",
    "not_image", "truncated", "empty_body", "tiny", "bomb", "noai", "noai_other_agent",
    "malformed_url", "empty_caption", "long_caption", "invalid_utf8_caption", "duplicate_id",
)
VARIANTS = (
    "cmyk_jpeg", "png_16bit", "palette_png_transparent", "rgba_png", "greyscale_jpeg",
    "animated_gif", "exif_rotated_jpeg",
)
NOISE_WEIGHTS = {"wrong_attribute": 0.4, "generic": 0.2, "spam": 0.15, "swapped": 0.25}
METADATA_FORMATS = ("parquet", "csv", "jsonl")
METADATA_COLUMNS = ("id", "url", "caption", "source_site", "license", "width", "height")
MIN_PLAIN_ROWS = 10  # dependent kinds (duplicates, swapped) need originals to point at

LONG_CAPTION_CHARS = 10_000
BOMB_SIDE = 40_000
REFUSED_BASE = "http://127.0.0.1:1"  # port 1: nothing listens there, so connecting is refused
MALFORMED_URLS = ("htp:/broken/{stem}.jpg", "not a url {stem}", "http:///{stem}.jpg", "://img/{stem}.jpg")
GENERIC_CAPTIONS = ("image", "photo", "untitled", "picture", "IMG_{n:04d}.JPG", "DSC{n:05d}.jpg", "thumbnail")
SPAM_CAPTIONS = (
    "buy cheap watches online",
    "best online casino bonus, click here",
    "cheap flights and hotel deals",
    "lose weight fast with one simple trick",
    "free shipping on all orders today",
    "download free movies in hd",
)
NEAR_COPY_WORDS = ("hd", "new", "2", "hq", "free", "best")
SOURCE_SITES = ("shapes-stock.example", "pinboard.example", "clipart-free.example", "myblog.example")
LICENSES = ("cc-by-4.0", "cc0-1.0", "unknown", None)
NOT_IMAGE_BODY = b"<!doctype html><html><head><title>Not Found</title></head><body>gone</body></html>\n"
# Random streams of a seed (numpy SeedSequence([seed, stream, ...])): each opt-in feature draws from
# its own, so a corpus without it is byte for byte what it was, and turning it on moves no other row.
ANNOTATED_STREAM, WEB_STREAM, WATERMARK_STREAM, PLANT_STREAM = 1, 2, 3, 5  # 4: evalset.EVAL_SET_STREAM


def _split(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to total, proportional to weights (largest remainder). Every key
    with a positive weight gets at least one when total allows it."""
    counts = {k: 0 for k in weights}
    positive = [k for k, w in weights.items() if w > 0]
    if total <= 0 or not positive:
        return counts
    if total >= len(positive):
        counts.update({k: 1 for k in positive})
    rest = total - sum(counts.values())
    weight_sum = sum(weights[k] for k in positive)
    shares = {k: rest * weights[k] / weight_sum for k in positive}
    for k in positive:
        counts[k] += int(shares[k])
    by_remainder = sorted(positive, key=lambda k: shares[k] - int(shares[k]), reverse=True)
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


@dataclass
class _Row:
    index: int
    stem: str
    kind: str
    fault: str | None = None
    variant: str | None = None
    id: str = ""
    scene: Scene | None = None  # the scene behind the URL; None when no decodable image is
    caption: bytes = b""
    body: bytes | None = None  # the file the server holds for this row
    file_name: str | None = None
    url_path: str = ""
    duplicate_of: str | None = None
    side: int = 0  # the side of the scene's rendering (a resized near copy keeps its original's)
    quality: int = 0  # its JPEG quality
    shape: tuple[int, int] | None = None  # (width, height) of an image that is not side x side (a planted copy)
    watermark: Watermark | None = None  # drawn over the row's image
    eval_id: str | None = None  # the evaluation image this row's image is a modified copy of
    drawn_scene: Scene | None = None  # the scene the main stream drew (a planted row shows another)


def _drawn(value: int | tuple[int, int], rng) -> int:
    """A fixed value, or one drawn from an inclusive (low, high) range: a fixed value draws nothing,
    so corpora of one image size stay byte for byte what they were."""
    if isinstance(value, int):
        return value
    low, high = value
    return int(rng.integers(low, high + 1))


# --- image encodings for the robustness variants and the content faults -----------------------

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, bit_depth: int, raw_rows: bytes) -> bytes:
    """A colour PNG from filter-prefixed rows; PIL cannot write 16-bit RGB, nor lying headers."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9)) + _png_chunk(b"IEND", b""))


def _png_16bit(image: Image.Image) -> bytes:
    pixels = np.asarray(image, dtype=np.uint16) * 257  # 0..255 -> 0..65535
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").view(np.uint8).reshape(height, width * 6)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0
    return _png(width, height, 16, rows.tobytes())


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A ~1 KB PNG whose header claims side x side pixels: a decompression-bomb sized header.
    Only a few rows of data follow, so nothing huge is ever actually stored."""
    return _png(side, side, 8, (b"\x00" * (1 + 3 * side)) * 4)


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _variant_file(variant: str, image: Image.Image, scene: Scene, rng, quality: int) -> tuple[bytes, str]:
    """(file bytes, extension) of a valid image of the scene in an unusual mode."""
    if variant == "cmyk_jpeg":
        return _saved(image.convert("CMYK"), "JPEG", quality=quality), "jpg"
    if variant == "greyscale_jpeg":
        return _saved(image.convert("L"), "JPEG", quality=quality), "jpg"
    if variant == "png_16bit":
        return _png_16bit(image), "png"
    if variant == "palette_png_transparent":
        palette_image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        background_index = palette_image.getpixel((0, 0))  # objects never reach the corner
        return _saved(palette_image, "PNG", transparency=background_index), "png"
    if variant == "rgba_png":
        pixels = np.asarray(image.convert("RGBA")).copy()
        is_background = (pixels[:, :, :3] == pixels[0, 0, :3]).all(axis=2)
        pixels[is_background, 3] = 0  # background transparent, its colour kept underneath
        return _saved(Image.fromarray(pixels, "RGBA"), "PNG"), "png"
    if variant == "animated_gif":
        second = render(scene, image.width, rng)  # same scene, jittered: a two-frame wiggle
        return _saved(image, "GIF", save_all=True, append_images=[second], duration=200, loop=0), "gif"
    if variant == "exif_rotated_jpeg":
        # Stored turned 90 degrees counter-clockwise, with Orientation 6 telling viewers to turn it
        # back: a decoder that ignores EXIF sees left/right as top/bottom.
        exif = Image.Exif()
        exif[0x0112] = 6
        rotated = image.transpose(Image.Transpose.ROTATE_90)
        return _saved(rotated, "JPEG", quality=quality, exif=exif.tobytes()), "jpg"
    raise ValueError(f"unknown variant {variant!r}")


# --- captions -------------------------------------------------------------------------------

def _true_caption(scene: Scene, rng, web_share: float) -> str:
    if rng.random() < web_share:
        return web_phrasing(scene, rng)
    return describe(scene, int(rng.integers(N_PHRASINGS)))


def _generic_caption(rng) -> str:
    template = GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))]
    return template.format(n=int(rng.integers(10_000)))


def _near_copy(caption: str, rng) -> str:
    """The caption with one or two words appended or dropped at the end, like a templated
    alt-text; never the caption itself."""
    while True:
        words = caption.split(" ")
        for _ in range(1 + int(rng.integers(2))):
            if rng.random() < 0.5 and len(words) > 3:
                words.pop()
            else:
                words.append(NEAR_COPY_WORDS[int(rng.integers(len(NEAR_COPY_WORDS)))])
        if words != caption.split(" "):
            return " ".join(words)


def _long_caption(caption: str) -> str:
    filler = " tags: shapes art design colour geometry wallpaper background pattern"
    text = caption + filler * (LONG_CAPTION_CHARS // len(filler) + 1)
    return text[:LONG_CAPTION_CHARS]


# --- the web corpus -------------------------------------------------------------------------

def _plan(n: int, noise: float, duplicates: float, fault_rate: float, web_share: float,
          faults: Sequence[str], variants: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
    """(kind, fault, variant) for every row, before shuffling."""
    n_faults = max(len(faults), round(fault_rate * n)) if faults else 0
    n_plain = n - n_faults - len(variants)
    if n_plain < MIN_PLAIN_ROWS:
        raise ValueError(
            f"n={n} is too small: {n_faults} fault rows and {len(variants)} variant rows are "
            f"reserved, and {MIN_PLAIN_ROWS} plain rows are needed; use n >= {n - n_plain + MIN_PLAIN_ROWS}"
        )
    duplicate_counts = _split(round(duplicates * n_plain), {k: 1 for k in DUPLICATE_KINDS})
    # near_duplicate_caption rows carry another image's caption, so they count towards noise.
    n_noise = max(0, round(noise * n_plain) - duplicate_counts["near_duplicate_caption"])
    noise_counts = _split(n_noise, NOISE_WEIGHTS)
    n_aligned = n_plain - sum(duplicate_counts.values()) - n_noise
    if n_aligned < 1:
        raise ValueError("noise + duplicates leave no aligned rows for duplicates to copy")
    aligned_counts = _split(n_aligned, {"clean": 1 - web_share, "web_phrasing": web_share})
    plan: list[tuple[str, str | None, str | None]] = []
    for counts in (aligned_counts, noise_counts, duplicate_counts):
        plan += [(kind, None, None) for kind, count in counts.items() for _ in range(count)]
    fault_counts = _split(n_faults, {f: 1 for f in faults})
    plan += [("fault", f, None) for f, count in fault_counts.items() for _ in range(count)]
    plan += [("clean", None, v) for v in variants]
    return plan


def _fill_fault(row: _Row, jpeg: bytes, image: Image.Image, rng, slow_ms: int, burst: int, quality: int) -> None:
    """URL, file and caption of a fault row whose image and true caption are already set."""
    jpg = f"{row.stem}.jpg"
    no_image = {"http_404", "refused", "reset", "redirect_loop", "not_image", "truncated", "empty_body", "bomb",
                "malformed_url"}
    urls = {
        "http_404": f"/f/404/{jpg}", "http_500_burst": f"/f/burst/{burst}/{jpg}",
        "refused": f"{REFUSED_BASE}/img/{jpg}", "reset": f"/f/reset/{jpg}", "slow": f"/f/slow/{slow_ms}/{jpg}",
        "redirect": f"/f/redirect/{jpg}", "redirect_loop": f"/f/loop/a/{jpg}", "noai": f"/f/noai/{jpg}",
        "noai_other_agent": f"/f/noai-other/{jpg}", "bomb": f"/img/{row.stem}.png",
        "malformed_url": MALFORMED_URLS[int(rng.integers(len(MALFORMED_URLS)))].format(stem=row.stem),
    }
    bodies = {
        "http_404": None, "refused": None, "redirect_loop": None, "malformed_url": None,
        "not_image": NOT_IMAGE_BODY, "truncated": jpeg[: len(jpeg) // 2], "empty_body": b"",
        "tiny": encode_jpeg(image.resize((4, 4), Image.Resampling.BOX), quality), "bomb": bomb_png(),
    }
    row.url_path = urls.get(row.fault, f"/img/{jpg}")
    row.body = bodies.get(row.fault, jpeg)
    row.file_name = None if row.body is None else row.url_path.rsplit("/", 1)[1]
    if row.fault in no_image:
        row.scene = None
        row.watermark = None  # nothing decodable to see it on
    if row.fault == "empty_caption":
        row.caption = b""
    elif row.fault == "long_caption":
        row.caption = _long_caption(row.caption.decode()).encode()
    elif row.fault == "invalid_utf8_caption":
        row.caption += b" \xff\xfe caf\xe9"  # bytes of a latin-1 dump inside UTF-8 text


def _own_caption(kind: str, scene: Scene, rng, web_share: float) -> str:
    """The caption of a row that does not depend on other rows."""
    if kind == "clean":
        return describe(scene, int(rng.integers(N_PHRASINGS)))
    if kind == "web_phrasing":
        return web_phrasing(scene, rng)
    if kind == "wrong_attribute":
        return _true_caption(change_one_attribute(scene, rng), rng, web_share)
    if kind == "generic":
        return _generic_caption(rng)
    if kind == "spam":
        return SPAM_CAPTIONS[int(rng.integers(len(SPAM_CAPTIONS)))]
    return _true_caption(scene, rng, web_share)  # faults: a true caption, the fault lies elsewhere


def _copy_caption(original: _Row, rng, plant_rng, web_share: float) -> bytes:
    """A true caption of the original's image. For a planted original the main stream still draws one
    for the scene it drew (so no later row moves), then the plant stream draws the one kept."""
    caption = _true_caption(original.drawn_scene, rng, web_share).encode()
    if original.eval_id is not None and original.scene is not None:
        caption = _true_caption(original.scene, plant_rng, web_share).encode()
    return caption


def _fill_copy(row: _Row, original: _Row, rng, web_share: float, image_size: int | tuple[int, int],
               jpeg_quality: int | tuple[int, int], plant_rng=None, weights=None) -> None:
    """Image and caption of a row that copies (duplicates) or borrows from (swapped) an original."""
    if row.kind in ("duplicate_image", "near_duplicate_image"):  # a copy shows what the original shows
        row.shape, row.watermark, row.eval_id = original.shape, original.watermark, original.eval_id
    if row.kind == "duplicate_image":
        _set_image(row, original.scene, original.body)
        row.side, row.quality = original.side, original.quality
        same = rng.random() < 0.5
        row.caption = original.caption if same else _copy_caption(original, rng, plant_rng, web_share)
    elif row.kind == "near_duplicate_image":
        image = Image.open(io.BytesIO(original.body)).convert("RGB")
        if rng.random() < 0.5:
            factor = rng.choice([0.875, 1.125, 1.25])
            image = image.resize((int(image.width * factor), int(image.height * factor)), Image.Resampling.BICUBIC)
        row.side, row.quality = original.side, int(rng.choice([q for q in (50, 60, 70, 80) if q != original.quality]))
        _set_image(row, original.scene, encode_jpeg(image, row.quality))
        row.caption = _copy_caption(original, rng, plant_rng, web_share)
    else:  # swapped, near_duplicate_caption: a fresh image under the original's caption
        scene = sample_scene(rng, weights)
        while scene in (original.scene, original.drawn_scene):
            scene = sample_scene(rng, weights)
        row.side, row.quality = _drawn(image_size, rng), _drawn(jpeg_quality, rng)
        _set_image(row, scene, encode_jpeg(_marked(render(scene, row.side, rng), row), row.quality))
        caption = original.caption.decode()
        row.caption = (caption if row.kind == "swapped" else _near_copy(caption, rng)).encode()
    if row.kind != "swapped":
        row.duplicate_of = original.id


def _set_image(row: _Row, scene: Scene, body: bytes, ext: str = "jpg") -> None:
    row.scene, row.body = scene, body
    row.file_name = f"{row.stem}.{ext}"
    row.url_path = f"/img/{row.file_name}"


def _marked(image: Image.Image, row: _Row) -> Image.Image:
    return image if row.watermark is None else draw_watermark(image, row.watermark)


def _watermarks(rows: list[_Row], seed: int, rate: float, opacity: tuple[float, float]) -> None:
    """Give about `rate` of the rows a watermark. Each row draws from its own stream, so whether and
    how a row is marked does not depend on the other rows, and a higher rate marks a superset."""
    if rate <= 0:
        return
    for row in rows:
        rng = np.random.default_rng([seed, WATERMARK_STREAM, row.index])
        if rng.random() < rate:
            row.watermark = sample_watermark(rng, opacity)


def _plan_plants(rows: list[_Row], images: list[EvalImage], rate: float, seed: int) -> tuple[dict, np.random.Generator]:
    """{row index: evaluation image} for round(rate * rows) rows that render their own plain image
    (no fault, variant, copy or swap), and the stream their modified copies draw from."""
    rng = np.random.default_rng([seed, PLANT_STREAM])
    own_image = {*ALIGNED_KINDS, "wrong_attribute", "generic", "spam"}
    eligible = [r.index for r in rows if r.kind in own_image and r.fault is None and r.variant is None]
    count = min(round(rate * len(rows)), len(eligible))
    if count == 0 or not images:
        return {}, rng
    chosen = sorted(int(i) for i in rng.choice(eligible, count, replace=False))
    picks = rng.choice(len(images), count, replace=count > len(images))
    return {i: images[int(j)] for i, j in zip(chosen, picks)}, rng


def _plant(row: _Row, image: EvalImage, rng, web_share: float) -> tuple[Image.Image, Scene | None, bytes | None]:
    """A modified copy of an evaluation image for the row (cropped, resized; row.quality becomes
    another JPEG quality), the scene it shows (None when the evaluation set does not say), and a
    caption of that scene as the row's kind writes it (None when the scene is unknown: the row keeps
    the caption it drew)."""
    copy, row.quality = modified_copy(image, rng)
    row.eval_id, row.shape, row.side = image.id, copy.size, max(copy.size)
    caption = None if image.scene is None else _own_caption(row.kind, image.scene, rng, web_share).encode()
    return copy, image.scene, caption


def _pick_original(pool: list[_Row], rng, before: int | None = None) -> _Row:
    candidates = pool if before is None else [r for r in pool if r.index < before]
    return candidates[int(rng.integers(len(candidates)))]


def _truth_table(rows: list[_Row], rng) -> pa.Table:
    def claimed_size(row: _Row) -> tuple[int | None, int | None]:
        """What the page said: mostly the truth, sometimes nothing, sometimes a stale original size."""
        u = rng.random()
        if u < 0.1:
            return None, None
        if u < 0.95:
            return row.shape or (row.side, row.side)
        return [(640, 480), (1024, 768), (256, 256)][int(rng.integers(3))]

    def aligned(row: _Row) -> bool | None:
        if row.scene is None:
            return None
        try:
            return parse(row.caption.decode("utf-8")) == row.scene
        except UnicodeDecodeError:
            return False

    sites = [SOURCE_SITES[int(rng.integers(len(SOURCE_SITES)))] for _ in rows]
    licences = [LICENSES[int(rng.integers(len(LICENSES)))] for _ in rows]
    sizes = [claimed_size(row) for row in rows]
    return pa.table({
        "id": pa.array([r.id for r in rows], pa.string()),
        "url_path": pa.array([r.url_path for r in rows], pa.string()),
        "kind": pa.array([r.kind for r in rows], pa.string()),
        "fault": pa.array([r.fault for r in rows], pa.string()),
        "variant": pa.array([r.variant for r in rows], pa.string()),
        "scene": pa.array([None if r.scene is None else r.scene.to_json() for r in rows], pa.string()),
        "aligned": pa.array([aligned(r) for r in rows], pa.bool_()),
        "duplicate_of": pa.array([r.duplicate_of for r in rows], pa.string()),
        "file": pa.array([None if r.file_name is None else f"img/{r.file_name}" for r in rows], pa.string()),
        "caption": pa.array([r.caption for r in rows], pa.binary()),  # raw bytes: one row is not UTF-8
        "source_site": pa.array(sites, pa.string()),
        "license": pa.array(licences, pa.string()),
        "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
        "watermark": pa.array([r.watermark is not None for r in rows], pa.bool_()),
        "eval_id": pa.array([r.eval_id for r in rows], pa.string()),
    })


def make_web_corpus(
    out_dir: str | Path,
    n: int,
    seed: int,
    noise: float = 0.45,
    duplicates: float = 0.06,
    fault_rate: float = 0.04,
    web_share: float = 0.5,
    faults: Sequence[str] = FAULTS,
    variants: Sequence[str] = VARIANTS,
    slow_ms: int = 2000,
    burst: int = 2,
    image_size: int | tuple[int, int] = 64,
    jpeg_quality: int | tuple[int, int] = 90,
    overwrite: bool = False,
    watermark_rate: float = 0.0,
    watermark_opacity: tuple[float, float] = WATERMARK_OPACITY,
    eval_set: str | Path | Sequence | None = None,
    eval_rate: float = 0.01,
    zipf: float = 0.0,
) -> dict:
    """Write a noisy web corpus of n rows under out_dir and return its summary (also written to
    out_dir/corpus.json).

    noise: share of plain rows (neither fault nor variant) whose caption does not describe the
    image; duplicates: share of plain rows that copy another row; fault_rate: share of rows that
    are faults (each fault kind at least once); web_share: share of correct captions in web style.
    image_size and jpeg_quality: one value for every image, or an inclusive (low, high) range each
    image draws from (web sizes: (512, 2048) and (60, 95)).

    Opt-in, each from its own random stream (off, the corpus is byte for byte what it was; on, only the
    rows it touches change):
    watermark_rate: share of rows whose image gets a translucent word or logo (scene.sample_watermark,
    opacity drawn from watermark_opacity); copies of a marked image are marked too.
    eval_set: an evaluation set (anything evalset.read_eval_set reads: a folder written by make_eval_set,
    a Parquet file, a tar, or a sequence of (id, jpeg bytes[, scene]) or EvalImage): round(eval_rate * n)
    plain rows show a modified copy of one of its images (evalset.modified_copy), and copies of those
    rows do too (swapped rows that borrow such a row's caption change with it).
    truth.parquet's `watermark` and `eval_id` columns say which (always present: False / null when off).
    zipf: a skewed world: the objects' colour x shape concepts follow Zipf's law with this exponent over a
    seeded order (scene.concept_ranking; corpus.json's `concepts` lists them, most frequent first); 0: uniform.
    """
    unknown = (set(faults) - set(FAULTS)) | (set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown fault or variant kinds: {sorted(unknown)}")
    for name, share in (("watermark_rate", watermark_rate), ("eval_rate", eval_rate)):
        if not 0 <= share <= 1:  # also refuses nan
            raise ValueError(f"{name} must be a share between 0 and 1, not {share}")
    if not zipf >= 0:  # also refuses nan
        raise ValueError(f"zipf must be an exponent >= 0 (0: uniform), not {zipf}")
    ranking = concept_ranking(zipf, seed) if zipf > 0 else None
    weights = concept_weights(ranking)
    eval_images = None if eval_set is None else read_eval_set(eval_set)
    if eval_images is not None and not eval_images:
        raise ValueError("eval_set holds no images")
    out_dir = Path(out_dir)
    site_dir = out_dir / "site"
    if site_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{site_dir} exists; pass overwrite=True to replace the corpus")
        shutil.rmtree(site_dir)
        for stale in out_dir.glob("metadata.*"):  # it described the old corpus
            stale.unlink()
    rng = np.random.default_rng([seed, WEB_STREAM])
    plan = _plan(n, noise, duplicates, fault_rate, web_share, faults, variants)
    order = list(rng.permutation(len(plan)))
    # A plain aligned row first, so that every duplicate_id row has an earlier id to reuse.
    plain_aligned = {(kind, None, None) for kind in ALIGNED_KINDS}
    first_plain = next(i for i, j in enumerate(order) if plan[j] in plain_aligned)
    order[0], order[first_plain] = order[first_plain], order[0]
    digits = max(6, len(str(n - 1)))
    rows = [_Row(i, f"{i:0{digits}d}", *plan[j]) for i, j in enumerate(order)]
    for row in rows:
        row.id = row.stem
    _watermarks(rows, seed, watermark_rate, watermark_opacity)
    plants, plant_rng = _plan_plants(rows, eval_images, eval_rate, seed) if eval_images else ({}, None)

    # Pass 1: rows that stand on their own.
    dependent_kinds = {"swapped", *DUPLICATE_KINDS}
    for row in rows:
        if row.kind in dependent_kinds:
            continue
        scene = sample_scene(rng, weights)
        row.side, row.quality = _drawn(image_size, rng), _drawn(jpeg_quality, rng)
        image = render(scene, row.side, rng)
        row.drawn_scene = scene
        shown, planted_caption = scene, None
        if row.index in plants:  # after the main stream's draws for the rendering, so no other row moves
            image, shown, planted_caption = _plant(row, plants[row.index], plant_rng, web_share)
        image = _marked(image, row)
        jpeg = encode_jpeg(image, row.quality)
        _set_image(row, shown, jpeg)
        if row.variant is not None:
            _set_image(row, scene, *_variant_file(row.variant, image, scene, rng, row.quality))
        row.caption = _own_caption(row.kind, scene, rng, web_share).encode()
        if planted_caption is not None:
            row.caption = planted_caption
        if row.fault is not None:
            _fill_fault(row, jpeg, image, rng, slow_ms, burst, row.quality)

    # Pass 2: rows that copy or point at a plain aligned row.
    pool = [r for r in rows if r.kind in ALIGNED_KINDS and r.fault is None and r.variant is None]
    for row in rows:
        if row.fault == "duplicate_id":
            original = _pick_original(pool, rng, before=row.index)
            row.id = row.duplicate_of = original.id
        if row.kind in dependent_kinds:
            _fill_copy(row, _pick_original(pool, rng), rng, web_share, image_size, jpeg_quality, plant_rng, weights)

    (site_dir / "img").mkdir(parents=True)
    for row in rows:
        if row.body is not None:
            (site_dir / "img" / row.file_name).write_bytes(row.body)
    truth = _truth_table(rows, rng)
    pq.write_table(truth, out_dir / "truth.parquet")

    aligned = truth.column("aligned").to_pylist()
    image_rows = sum(a is not None for a in aligned)
    summary = {
        "seed": seed,
        "n": n,
        "params": {"noise": noise, "duplicates": duplicates, "fault_rate": fault_rate, "web_share": web_share,
                   "slow_ms": slow_ms, "burst": burst, "image_size": image_size, "jpeg_quality": jpeg_quality,
                   "faults": list(faults), "variants": list(variants)},
        "kinds": {k: sum(r.kind == k for r in rows) for k in KINDS},
        "faults": {f: sum(r.fault == f for r in rows) for f in faults},
        "variants": {v: sum(r.variant == v for r in rows) for v in variants},
        "image_rows": image_rows,
        "misaligned_image_rows": sum(a is False for a in aligned),
        "noise_share": round(sum(a is False for a in aligned) / max(1, image_rows), 4),
    }
    # Opt-in features appear in the summary only when on, so a corpus without them keeps its bytes.
    if watermark_rate > 0:
        summary["params"].update(watermark_rate=watermark_rate, watermark_opacity=list(watermark_opacity))
        summary["watermarked"] = sum(r.watermark is not None for r in rows)
    if eval_images is not None:
        summary["params"].update(eval_rate=eval_rate, eval_set=str(eval_set) if isinstance(eval_set, (str, Path))
                                 else f"{len(eval_images)} images")
        summary["planted"] = sum(r.eval_id is not None for r in rows)
    if ranking is not None:
        summary["params"]["zipf"] = zipf
        summary["concepts"] = [[colour, shape, round(p, 6)] for colour, shape, p in ranking]
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --- the metadata the pipeline reads --------------------------------------------------------

def _string_from_bytes(values: pa.Array) -> pa.Array:
    """A string array over the same buffers as a binary one, without UTF-8 validation: real dumps
    contain invalid rows, and the pipeline must meet them as such."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pa.Array.from_buffers(pa.string(), len(values), values.buffers(), values.null_count, values.offset)


def write_metadata(
    out_dir: str | Path, base_url: str, path: str | Path | None = None, fmt: str | None = None
) -> Path:
    """Write the LAION-style metadata (id, url, caption, source_site, license, width, height) for a
    server at base_url, to path (default out_dir/metadata.<fmt>). fmt is parquet, csv or jsonl,
    taken from path's suffix when not given. Captions are written as raw bytes, invalid row included."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    out_dir = Path(out_dir)
    fmt = fmt or (Path(path).suffix.lstrip(".") if path is not None else "parquet")
    if fmt not in METADATA_FORMATS:
        raise ValueError(f"format must be one of {METADATA_FORMATS}, got {fmt!r}")
    path = Path(path) if path is not None else out_dir / f"metadata.{fmt}"
    truth = pq.read_table(out_dir / "truth.parquet")
    base = base_url.rstrip("/")
    # A path starting with "/" lives on the server; anything else is a full (refused or malformed) URL.
    urls = [p if not p.startswith("/") else base + p for p in truth.column("url_path").to_pylist()]
    table = pa.table({
        "id": truth.column("id"),
        "url": pa.array(urls, pa.string()),
        "caption": _string_from_bytes(truth.column("caption")),
        **{name: truth.column(name) for name in METADATA_COLUMNS[3:]},
    })
    if fmt == "parquet":
        pq.write_table(table, path)
        return path
    records = table.drop_columns(["caption"]).to_pylist()
    # surrogateescape carries the raw caption bytes through str and back out unchanged.
    captions = [c.decode("utf-8", "surrogateescape") for c in truth.column("caption").to_pylist()]
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        if fmt == "csv":
            writer = csv.writer(f)
            writer.writerow(METADATA_COLUMNS)
            for record, caption in zip(records, captions):
                record["caption"] = caption
                writer.writerow(["" if record[c] is None else record[c] for c in METADATA_COLUMNS])
        else:
            for record, caption in zip(records, captions):
                record["caption"] = caption
                f.write(json.dumps({c: record[c] for c in METADATA_COLUMNS}, ensure_ascii=False) + "\n")
    return path


# --- the annotated split --------------------------------------------------------------------

def make_annotated(out_dir: str | Path, n: int, seed: int, image_size: int = 64, jpeg_quality: int = 90) -> Path:
    """Write out_dir/annotated.parquet: n images, each with all clean phrasings of its scene.
    The same seed as a web corpus gives different images (separate random streams)."""
    rng = np.random.default_rng([seed, ANNOTATED_STREAM])
    ids, images, captions, scenes = [], [], [], []
    for i in range(n):
        scene = sample_scene(rng)
        ids.append(f"{i:07d}")
        images.append(encode_jpeg(render(scene, image_size, rng), jpeg_quality))
        captions.append([describe(scene, p) for p in range(N_PHRASINGS)])
        scenes.append(scene.to_json())
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "image": pa.array(images, pa.binary()),
        "width": pa.array([image_size] * n, pa.int32()),
        "height": pa.array([image_size] * n, pa.int32()),
        "captions": pa.array(captions, pa.list_(pa.string())),
        "scene": pa.array(scenes, pa.string()),
    })
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "annotated.parquet"
    pq.write_table(table, path)
    return path
