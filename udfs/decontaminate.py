"""Evaluation-set decontamination inside Python workers (no Spark): embed the evaluation images as the
pipeline embeds its own, then find each row's nearest evaluation image.

An evaluation image goes through the download stage's resizer (the run's image_size, resize mode and
encoder) and then the run's CLIP, so that a copy of it in the data, downloaded and embedded by the
pipeline, lands next to it. Its sha256 is taken of the file's bytes, as the download stage hashes
what it fetched: an exact copy matches by hash whatever the embedding says.

The embedding only proposes: a CLIP says what a picture shows, and two pictures of the same thing lie
as close as a copy does. A candidate is confirmed on the pixels (`copy_residual`): a copy is the
original cropped a little, resized and re-encoded, so the original's centre, scaled by the right
factor, lies somewhere in the copy almost unchanged; another picture leaves a residual at the best
placement.
"""
from __future__ import annotations

import hashlib

import numpy as np

_INDEX: dict = {}  # eval embeddings folder -> (faiss index, ids): once per Python worker
THUMB = 64            # side at which a candidate pair is compared
MARGIN = 0.16         # the share of each side of the original left out of the comparison: more than a crop takes
SCALES = np.arange(1.0, 1.25, 0.02)  # how much larger the copy shows the original's content (crops of up to ~20%)


class EvalEmbedder:
    """frame (eval_id, image bytes) -> frame (eval_id, sha256, embedding float32 bytes, error)."""

    def __init__(self, download, clip_settings):
        self.download = download
        self.clip = clip_settings

    def __call__(self, frame):
        import io

        import pandas as pd

        from capfilt.net.fetch import stored_form
        from capfilt.udfs.images import decode_images
        from capfilt.udfs.models import cached_clip, worker_model

        resize = stored_form(self.download)
        stored, errors = [], []
        for blob in frame["image"].tolist():
            image, _, _, _, _, error = resize(io.BytesIO(blob or b""))
            stored.append(image)
            errors.append(None if image is not None else (error or "the image does not decode"))
        images, decode_errors = decode_images([b if b is not None else b"" for b in stored])
        ok = [i for i, im in enumerate(images) if im is not None and errors[i] is None]
        embeddings = worker_model(self.clip, cached_clip).encode_images([images[i] for i in ok],
                                                                        self.clip.batch_size) if ok else []
        out = [None] * len(images)
        for j, i in enumerate(ok):
            out[i] = np.asarray(embeddings[j], dtype="<f4").tobytes()
        return pd.DataFrame({
            "eval_id": frame["eval_id"].tolist(), "stored": stored,
            "sha256": [hashlib.sha256(b).hexdigest() if b is not None else None for b in frame["image"].tolist()],
            "embedding": out,
            "error": [e or (d if out[i] is None else None) for i, (e, d) in enumerate(zip(errors, decode_errors))]})


def _index(folder: str):
    """faiss inner-product index over the evaluation embeddings written to `folder` (Parquet)."""
    if folder not in _INDEX:
        import faiss
        import pyarrow.dataset as ds
        table = ds.dataset(folder, format="parquet").to_table(columns=["eval_id", "embedding"],
                                                              filter=ds.field("embedding").is_valid())
        ids = np.asarray(table.column("eval_id").to_pylist(), dtype=object)
        blobs = table.column("embedding").to_pylist()
        dim = len(blobs[0]) // 4 if blobs else 1
        matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, dim) if blobs else np.zeros((0, 1), "f4")
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(matrix, dtype=np.float32))
        _INDEX.clear()  # one evaluation set per worker at a time
        _INDEX[folder] = (index, ids)
    return _INDEX[folder]


def nearest_eval(embeddings: list, folder: str, k: int = 5, floor: float = -1.0) -> tuple[list, list]:
    """For each stored float16 row embedding: the ids and cosines of its k nearest evaluation images
    at cosine >= floor, best first (empty lists for a row without an embedding)."""
    from capfilt.udfs.heads import embeddings_from_bytes
    index, ids = _index(folder)
    x = embeddings_from_bytes(embeddings)
    valid = ~np.isnan(x).any(axis=1) if x.size else np.zeros(len(x), bool)
    found_ids, found = [[] for _ in range(len(x))], [[] for _ in range(len(x))]
    if index.ntotal and valid.any() and x.shape[1] != index.d:
        raise ValueError(f"the evaluation embeddings are {index.d}-d, the stored embeddings {x.shape[1]}-d")
    if index.ntotal and valid.any():
        scores, hits = index.search(np.ascontiguousarray(x[valid], dtype=np.float32), min(k, index.ntotal))
        for row, ss, hh in zip(np.flatnonzero(valid), scores, hits):
            keep = [(float(v), int(h)) for v, h in zip(ss, hh) if h >= 0 and v >= floor]
            found_ids[row], found[row] = [ids[h] for _, h in keep], [v for v, _ in keep]
    return found_ids, found


def thumbnail(data: bytes | None):
    """The picture at THUMB x THUMB, RGB float32, lightly blurred (JPEG noise out, content kept); None
    when the bytes do not decode."""
    import cv2
    from PIL import Image

    from capfilt.udfs.images import thumbnail_image
    image = thumbnail_image(data, THUMB, Image.Resampling.BILINEAR)
    return None if image is None else cv2.GaussianBlur(np.asarray(image, dtype=np.float32), (0, 0), 2.0)


def copy_residual(copy, original) -> float:
    """How far `copy` is from being `original` cropped, resized and re-encoded (RMS, 0-255): the
    original's centre, scaled as a crop would scale it, placed where it fits `copy` best."""
    import cv2
    best = np.inf
    for scale in SCALES:
        side = int(round(THUMB * scale))
        scaled = cv2.resize(original, (side, side), interpolation=cv2.INTER_AREA)
        cut = int(round(MARGIN * THUMB * scale))
        centre = np.ascontiguousarray(scaled[cut:side - cut, cut:side - cut])
        if centre.shape[0] > THUMB:
            continue
        best = min(best, float(cv2.matchTemplate(copy, centre, cv2.TM_SQDIFF).min()) / centre.size)
    return float(np.sqrt(max(best, 0.0)))


def _stored_images(folder: str, ids: set) -> dict:
    """{eval_id: stored image bytes} of the given evaluation images."""
    import pyarrow.dataset as ds
    table = ds.dataset(folder, format="parquet").to_table(columns=["eval_id", "stored"],
                                                          filter=ds.field("eval_id").isin(sorted(ids)))
    return dict(zip(table.column("eval_id").to_pylist(), table.column("stored").to_pylist()))


def confirm_copies(images: list, candidates: list, folder: str, tolerance: float) -> tuple[list, list]:
    """For each row (its stored image bytes and candidate eval ids, best first): the first candidate
    whose residual is within tolerance, and that residual (None, None when none is)."""
    wanted = {c for row in candidates for c in (row or [])}
    originals = {k: thumbnail(v) for k, v in _stored_images(folder, wanted).items()} if wanted else {}
    best_id, best = [None] * len(images), [None] * len(images)
    for i, (data, row) in enumerate(zip(images, candidates)):
        copy = thumbnail(data) if row else None
        if copy is None:  # no candidate, or an undecodable stored image: nothing to confirm
            continue
        for eval_id in row:
            if originals.get(eval_id) is not None:
                residual = copy_residual(copy, originals[eval_id])
                if residual <= tolerance:
                    best_id[i], best[i] = eval_id, residual
                    break
    return best_id, best
