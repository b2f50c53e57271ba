"""Evaluation-set decontamination inside Python workers (no Spark): embed the evaluation images as the
pipeline embeds its own, then find each row's nearest evaluation image.

An evaluation image goes through the download stage's resizer (the run's image_size, resize mode and
encoder) and then the run's CLIP, so that a copy of it in the data, downloaded and embedded by the
pipeline, lands next to it. Its sha256 is taken of the file's bytes, as the download stage hashes
what it fetched: an exact copy matches by hash whatever the embedding says.
"""
from __future__ import annotations

import hashlib

import numpy as np

_INDEX: dict = {}  # eval embeddings folder -> (faiss index, ids): once per Python worker


class EvalEmbedder:
    """frame (eval_id, image bytes) -> frame (eval_id, sha256, embedding float32 bytes, error)."""

    def __init__(self, download, clip_settings):
        self.download = download
        self.clip = clip_settings

    def __call__(self, frame):
        import io

        import pandas as pd

        from capfilt.pipelines.inference import worker_model
        from capfilt.udfs.fetch import stored_form
        from capfilt.udfs.images import decode_images
        from capfilt.udfs.models import cached_clip

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
            "eval_id": frame["eval_id"].tolist(),
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


def nearest_eval(embeddings: list, folder: str) -> tuple[list, list]:
    """For each stored float16 row embedding: the nearest evaluation image's id and the cosine (None for
    a row without an embedding, or an empty evaluation set)."""
    from capfilt.udfs.heads import embeddings_from_bytes
    index, ids = _index(folder)
    x = embeddings_from_bytes(embeddings)
    valid = ~np.isnan(x).any(axis=1) if x.size else np.zeros(len(x), bool)
    best_id, best = [None] * len(x), [None] * len(x)
    if index.ntotal and valid.any() and x.shape[1] == index.d:
        scores, found = index.search(np.ascontiguousarray(x[valid], dtype=np.float32), 1)
        for row, s, f in zip(np.flatnonzero(valid), scores[:, 0], found[:, 0]):
            if f >= 0:
                best_id[row], best[row] = ids[f], float(s)
    elif index.ntotal and valid.any():
        raise ValueError(f"the evaluation embeddings are {index.d}-d, the stored embeddings {x.shape[1]}-d")
    return best_id, best
