"""A held-out evaluation set of the shapes world, and the modified copies of its images that a web
corpus can plant (make_web_corpus(eval_set=...)), so that decontamination can be measured.

The set is rendered from its own random stream of the seed, so no corpus or annotated split of any
seed draws the same sequence. It is written in one of three layouts that training and evaluation code
reads, with the same ids in each:
- folder:  DIR/<id>.jpg (id = file stem)
- parquet: DIR/eval.parquet with columns key (string id) and image (JPEG bytes)
- wds:     DIR/eval-000000.tar ... (WebDataset: members <key>.jpg, so __key__ is the id)
and DIR/eval_set.json (seed, size, quality, format, files, and per image its id, scene and sha256).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.world.scene import Scene, encode_jpeg, render, sample_scene

EVAL_SET_STREAM = 4  # the seed's stream for evaluation images (corpus.py lists the others)
EVAL_FORMATS = ("folder", "parquet", "wds")
MANIFEST = "eval_set.json"
PARQUET_FILE = "eval.parquet"
SHARD_NAME = "eval-{:06d}.tar"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# A planted copy: each side cropped by 0..COPY_CROP of the image, the rest resized by a factor in
# COPY_SCALE, re-encoded at a JPEG quality in COPY_QUALITY other than the original's.
COPY_CROP = 0.08
COPY_SCALE = (0.6, 1.5)
COPY_QUALITY = (50, 85)


@dataclass(frozen=True)
class EvalImage:
    id: str
    jpeg: bytes
    scene: Scene | None = None  # None when the set does not say (images given without a manifest)
    quality: int | None = None  # the JPEG quality it was written at, when known


def eval_ids(n: int) -> list[str]:
    return [f"eval-{i:06d}" for i in range(n)]


def eval_images(n: int, seed: int, image_size: int = 64, jpeg_quality: int = 90) -> list[EvalImage]:
    """The n images of the evaluation set of `seed`, in memory."""
    rng = np.random.default_rng([seed, EVAL_SET_STREAM])
    images = []
    for key in eval_ids(n):
        scene = sample_scene(rng)
        picture = photographed(render(scene, image_size, rng), rng)
        images.append(EvalImage(key, encode_jpeg(picture, jpeg_quality), scene, jpeg_quality))
    return images


TEXTURE = 20.0  # amplitude (0-255) of an evaluation image's own smooth shading


def photographed(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture with a smooth shading of its own, as every photograph has its own light and grain. The
    world draws one description at nearly the same place every time, so without it another row of the
    same scene could be the very same picture as an evaluation image, which no photograph is."""
    grid = rng.normal(0.0, 1.0, (8, 8, 3)).astype(np.float32)
    shade = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(image.size, Image.Resampling.BICUBIC))
                      for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + TEXTURE * shade, 0, 255).astype(np.uint8))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: same seed, same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def make_eval_set(out_dir: str | Path, n: int, seed: int, fmt: str = "folder", image_size: int = 64,
                  jpeg_quality: int = 90, shard_size: int = 1000, overwrite: bool = False) -> Path:
    """Write the evaluation set of n images for `seed` to out_dir in layout fmt (folder, parquet or
    wds) and its manifest; returns the manifest's path. Same arguments, same bytes. A folder that
    holds another evaluation set is replaced only with overwrite; any other non-empty folder is refused."""
    if fmt not in EVAL_FORMATS:
        raise ValueError(f"format must be one of {EVAL_FORMATS}, not {fmt!r}")
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be 1 or more, not {n} and {shard_size}")
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if manifest_path.is_file():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds an evaluation set; pass overwrite=True to replace it")
        listed = json.loads(manifest_path.read_text()).get("files", [])
        # Only the set's own files, checked before any is removed: a hand-edited list could name
        # ../anything, and a folder that also holds other files is not the set's to replace.
        others = sorted({p.name for p in out_dir.iterdir()} - {MANIFEST, *listed})
        if any(not isinstance(n, str) or Path(n).name != n or n in (".", "..") for n in listed):
            raise ValueError(f"{manifest_path} names files outside {out_dir}: not an evaluation set to replace")
        if others:
            raise ValueError(f"{out_dir} holds more than an evaluation set ({', '.join(others[:3])}): write it to "
                             f"a new folder")
        for name in listed:
            (out_dir / name).unlink(missing_ok=True)
        manifest_path.unlink()
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no evaluation set: write it to a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    images = eval_images(n, seed, image_size, jpeg_quality)
    if fmt == "folder":
        files = [f"{image.id}.jpg" for image in images]
        for name, image in zip(files, images):
            (out_dir / name).write_bytes(image.jpeg)
    elif fmt == "parquet":
        files = [PARQUET_FILE]
        table = pa.table({"key": pa.array([i.id for i in images], pa.string()),
                          "image": pa.array([i.jpeg for i in images], pa.binary())})
        pq.write_table(table, out_dir / PARQUET_FILE)
    else:
        files = []
        for shard, start in enumerate(range(0, n, shard_size)):
            files.append(SHARD_NAME.format(shard))
            with tarfile.open(out_dir / files[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
                for image in images[start:start + shard_size]:
                    _tar_member(tar, f"{image.id}.jpg", image.jpeg)
    manifest = {
        "seed": seed, "n": n, "format": fmt, "image_size": image_size, "jpeg_quality": jpeg_quality,
        "files": files,
        "images": [{"id": i.id, "scene": i.scene.to_json(), "sha256": hashlib.sha256(i.jpeg).hexdigest()}
                   for i in images],
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest_path


def _read_parquet(path: Path) -> list[tuple[str, bytes]]:
    table = pq.read_table(path, columns=["key", "image"])
    return list(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    """(key, bytes) of a WebDataset shard's image members; key is the name up to its first dot."""
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name.lower().endswith(IMAGE_EXTENSIONS):
                out.append((member.name[: len(member.name) - len(name)] + name.split(".", 1)[0],
                            tar.extractfile(member).read()))
    return out


def _read_files(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.stem, p.read_bytes()) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def read_eval_set(source: str | Path | Sequence) -> list[EvalImage]:
    """The images of an evaluation set: a folder in any of the three layouts (with or without a
    manifest), a Parquet file (key, image), a WebDataset tar, or a sequence of EvalImage or
    (id, jpeg bytes) or (id, jpeg bytes, scene) tuples (scene: a Scene, its JSON, or None)."""
    if not isinstance(source, (str, Path)):
        out = []
        for item in source:
            if isinstance(item, EvalImage):
                out.append(item)
                continue
            key, data, *rest = item
            scene = rest[0] if rest else None
            out.append(EvalImage(str(key), bytes(data), Scene.from_json(scene) if isinstance(scene, str) else scene))
        return out
    path = Path(source)
    manifest = {}
    if path.is_file():
        pairs = _read_parquet(path) if path.suffix == ".parquet" else _read_tar(path)
    elif path.is_dir():
        if (path / MANIFEST).is_file():
            manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") == "parquet" or (not manifest and (path / PARQUET_FILE).is_file()):
            pairs = _read_parquet(path / PARQUET_FILE)
        elif manifest.get("format") == "wds" or (not manifest and any(path.glob("*.tar"))):
            pairs = [pair for tar in sorted(path.glob("*.tar")) for pair in _read_tar(tar)]
        else:
            pairs = _read_files(path)
    else:
        raise ValueError(f"eval set {path} is neither a folder nor a file")
    scenes = {i["id"]: Scene.from_json(i["scene"]) for i in manifest.get("images", [])}
    quality = manifest.get("jpeg_quality")
    return [EvalImage(key, data, scenes.get(key), quality if key in scenes else None) for key, data in pairs]


def modified_copy(image: EvalImage, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """(copy, JPEG quality to encode it at): the image with each side cropped by 0-8%, resized by a
    factor of 0.6-1.5, and a quality other than the original's, as a re-posted copy on the web."""
    picture = Image.open(io.BytesIO(image.jpeg)).convert("RGB")
    width, height = picture.size
    left, top, right, bottom = rng.uniform(0, COPY_CROP, 4)
    picture = picture.crop((round(left * width), round(top * height),
                            width - round(right * width), height - round(bottom * height)))
    factor = rng.uniform(*COPY_SCALE)
    picture = picture.resize((max(8, round(picture.width * factor)), max(8, round(picture.height * factor))),
                             Image.Resampling.BICUBIC)
    qualities = [q for q in range(COPY_QUALITY[0], COPY_QUALITY[1] + 1) if q != image.quality]
    return picture, int(qualities[int(rng.integers(len(qualities)))])
