"""(image, caption) pairs to fine-tune on, read from what a team has: a curated OUT, a WebDataset, or a
Parquet of pairs (an annotated set: `capfilt world generate --annotated N` writes one).

    curated OUT     OUT/curated/*.parquet of a finished run: positives are the row's kept captions,
                    negatives the candidates the filter rejected (the data's own hard negatives)
    WebDataset      a .tar, or a folder of them: per key an image (.jpg/.jpeg/.png/.webp) and a caption
                    (.txt, or .json with `caption`); a .json with `candidates` (capfilt export) gives kept
                    captions as positives and rejected ones as negatives
    Parquet         a file or a folder of *.parquet: an `image` column (bytes, or a struct with `bytes`)
                    and `caption` / `text` (a string) or `captions` (a list); an optional `negatives` list

Images stay encoded in memory (a batch decodes its own); an image whose header does not parse is left
out and counted, as is a pair without a caption. Every problem with a source is one line naming it.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Pairs:
    images: list[bytes] = field(default_factory=list)
    positives: list[list[str]] = field(default_factory=list)   # captions that fit the image (>= 1)
    negatives: list[list[str]] = field(default_factory=list)   # captions the data rejected for it
    sources: list[dict] = field(default_factory=list)          # per source: path, kind, figures

    def __len__(self) -> int:
        return len(self.images)

    def pil(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.images[i])).convert("RGB")

    def subset(self, index) -> "Pairs":
        index = list(index)
        return Pairs([self.images[i] for i in index], [self.positives[i] for i in index],
                     [self.negatives[i] for i in index], self.sources)


def _texts(values) -> list[str]:
    """Distinct non-empty strings, in order."""
    out: list[str] = []
    for v in values or []:
        if isinstance(v, str) and v.strip() and v not in out:
            out.append(v)
    return out


class _Reader:
    """Collects one source's pairs, counting what it leaves out."""

    def __init__(self, path: Path, kind: str):
        self.pairs = Pairs()
        self.figures = {"path": str(path.resolve()), "kind": kind, "records": 0, "pairs": 0, "without_caption": 0,
                        "unreadable_image": 0, "with_negatives": 0}

    def add(self, image, positives, negatives=()) -> None:
        self.figures["records"] += 1
        positives = _texts(positives)
        if not positives:
            self.figures["without_caption"] += 1
            return
        if not isinstance(image, (bytes, bytearray)) or not _header_parses(bytes(image)):
            self.figures["unreadable_image"] += 1
            return
        negatives = [t for t in _texts(negatives) if t not in positives]
        self.figures["pairs"] += 1
        self.figures["with_negatives"] += bool(negatives)
        self.pairs.images.append(bytes(image))
        self.pairs.positives.append(positives)
        self.pairs.negatives.append(negatives)


def _header_parses(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001  (any decoder error: the image is left out and counted)
        return False


def _curated(root: Path) -> _Reader:
    import pyarrow.parquet as pq
    try:  # manifest.json is written last: an OUT without one is unfinished (pipelines/output.py)
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {root}: its manifest.json does not read ({e}): not a finished curate OUT") from None
    if not (root / "curated").is_dir():
        raise ValueError(f"--data {root}: a stage output without curated/ (give a `capfilt curate` OUT)")
    files = sorted((root / "curated").glob("*.parquet"))
    reader = _Reader(root, "curated")
    reader.figures["finished_at"] = manifest.get("finished_at")
    reader.figures["models"] = {k: v for k, v in (manifest.get("models") or {}).items() if isinstance(v, dict)}
    for file in files:
        table = pq.read_table(file, columns=["image", "candidates", "caption_primary"])
        for row in table.to_pylist():
            candidates = row["candidates"] or []
            kept = [c["text"] for c in candidates if c["kept"]]
            reader.add(row["image"], [row["caption_primary"], *kept], [c["text"] for c in candidates if not c["kept"]])
    return reader


def _parquet(path: Path) -> _Reader:
    import pyarrow.parquet as pq
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    reader = _Reader(path, "parquet")
    for file in files:
        names = set(pq.read_schema(file).names)
        text = next((c for c in ("captions", "caption", "text") if c in names), None)
        if "image" not in names or text is None:
            raise ValueError(f"--data {file}: needs an `image` column and a `caption`, `text` or `captions` "
                             f"column; it has {', '.join(sorted(names))}")
        columns = ["image", text] + (["negatives"] if "negatives" in names else [])
        for row in pq.read_table(file, columns=columns).to_pylist():
            image = row["image"]
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                image = image.get("bytes")
            captions = row[text] if text == "captions" and not isinstance(row[text], str) else [row[text]]
            reader.add(image, captions, row.get("negatives") or [])
    return reader


def _webdataset(path: Path) -> _Reader:
    tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
    reader = _Reader(path, "webdataset")
    for tar_path in tars:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    ext = ext.lower()
                    if ext in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                        samples.setdefault(f"{member.name[:len(member.name) - len(base)]}{key}", {})[ext] = \
                            tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise ValueError(f"--data {tar_path}: not a readable tar ({e})") from None
        for sample in samples.values():
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            positives, negatives = [], []
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except ValueError:
                    meta = {}
                candidates = meta.get("candidates") if isinstance(meta, dict) else None
                if isinstance(candidates, list):  # capfilt export: kept and rejected captions
                    positives += [c.get("text") for c in candidates if isinstance(c, dict) and c.get("kept")]
                    negatives += [c.get("text") for c in candidates if isinstance(c, dict) and not c.get("kept")]
                elif isinstance(meta, dict):
                    positives.append(meta.get("caption"))
            if "txt" in sample:
                positives.insert(0, sample["txt"].decode("utf-8", "replace"))
            reader.add(image, positives, negatives)
    return reader


def source_kind(path: Path) -> str:
    """Which reader a --data path takes (one line naming the path when none does)."""
    if not path.exists():
        raise ValueError(f"--data {path} does not exist")
    if path.is_dir() and (path / "manifest.json").is_file():
        return "curated"
    if path.suffix == ".tar" or path.is_dir() and any(path.glob("*.tar")):
        return "webdataset"
    if path.suffix == ".parquet" or path.is_dir() and any(path.glob("*.parquet")):
        return "parquet"
    raise ValueError(f"--data {path}: not a curated OUT (manifest.json), a WebDataset (.tar) or Parquet of pairs")


def read_pairs(paths: list[str]) -> Pairs:
    """Every --data source's pairs, in order; a source that yields no pair is refused, naming what it had."""
    out = Pairs()
    for text in paths:
        path = Path(text)
        kind = source_kind(path)
        reader = {"curated": _curated, "webdataset": _webdataset, "parquet": _parquet}[kind](path)
        f = reader.figures
        if not f["pairs"]:
            raise ValueError(f"--data {path}: no (image, caption) pair in {f['records']} records "
                             f"({f['without_caption']} without a caption, {f['unreadable_image']} with no readable image)")
        out.images += reader.pairs.images
        out.positives += reader.pairs.positives
        out.negatives += reader.pairs.negatives
        out.sources.append(f)
    return out
