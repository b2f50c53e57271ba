"""CLIP scores for a batch, free of Spark: the filter UDF's body.

One image embedding per row; text embeddings for the web caption and every synthetic caption;
cosine similarity of each with its image (embeddings are L2-normalised, so a dot product).
"""
from __future__ import annotations

import numpy as np


def clip_scores(clip, images: list, web_captions: list, synthetic: list, batch_size: int = 64):
    """(image embeddings (n, d) float32 with NaN rows where the image is None,
        scores: per row a float32 array [web, synthetic...], web NaN when the web caption is blank)."""
    rows = [i for i, image in enumerate(images) if image is not None]
    dim = clip.embed_dim
    embeddings = np.full((len(images), dim), np.nan, np.float32)
    scores: list = [None] * len(images)
    if not rows:
        return embeddings, scores
    embeddings[rows] = clip.encode_images([images[i] for i in rows], batch_size=batch_size)
    texts, spans = [], []
    for i in rows:
        web = web_captions[i]
        row_texts = [web if isinstance(web, str) and web.strip() else None] + list(synthetic[i] or [])
        spans.append((i, len(texts), row_texts))
        texts += [t for t in row_texts if t is not None]
    text_embeddings = clip.encode_texts(texts, batch_size=max(batch_size, 256))
    for i, start, row_texts in spans:
        row = np.full(len(row_texts), np.nan, np.float32)
        present = [j for j, t in enumerate(row_texts) if t is not None]
        row[present] = text_embeddings[start:start + len(present)] @ embeddings[i]
        scores[i] = row
    return embeddings, scores


def embedding_bytes(embedding: np.ndarray) -> bytes:
    """float16 little-endian: the curated record's image_embedding (half the size, enough for dedup)."""
    return np.asarray(embedding, dtype="<f2").tobytes()
