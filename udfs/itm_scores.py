"""ITM scores for a batch, free of Spark: the ITM half of the filter UDF's body.

The candidates of a row are its web caption and its synthetic captions, in that order (as in
`clip_scores`). Each scored candidate is matched against its image by the ITM model; the vision
tower runs once per image that has a candidate to score.
"""
from __future__ import annotations

import numpy as np


def itm_scores(itm, images: list, web_captions: list, synthetic: list, clip_scores: list | None = None,
               floor: float | None = None, batch_size: int = 64, text_batch_size: int = 256,
               top: int = 0) -> tuple[list, int]:
    """(scores, pairs): per row a float32 array [web, synthetic...] of match probabilities (None where
    the image is None), NaN for a blank web caption and, when `floor` is given, for a candidate whose
    CLIP score (`clip_scores`, same layout) is below it or NaN, and when `top` > 0 for one outside the
    row's `top` best CLIP scores (ties: the earlier candidate first; LAION-COCO's pre-rank); and the
    number of pairs scored."""
    out: list = [None] * len(images)
    rows, texts, slots = [], [], []  # image row, caption, (row, position)
    for i, image in enumerate(images):
        if image is None:
            continue
        web = web_captions[i]
        candidates = [web if isinstance(web, str) and web.strip() else None] + list(synthetic[i] or [])
        out[i] = np.full(len(candidates), np.nan, np.float32)
        ranked = None
        if top > 0:
            scored = [j for j, text in enumerate(candidates) if text is not None and not np.isnan(clip_scores[i][j])]
            ranked = set(sorted(scored, key=lambda j: (-clip_scores[i][j], j))[:top])
        for j, text in enumerate(candidates):
            if text is None or floor is not None and not clip_scores[i][j] >= floor:
                continue
            if ranked is not None and j not in ranked:
                continue
            rows.append(i)
            texts.append(text)
            slots.append((i, j))
    if not texts:
        return out, 0
    needed = sorted(set(rows))
    position = {row: k for k, row in enumerate(needed)}
    embeds = itm.embed([images[i] for i in needed], batch_size=batch_size)
    scores = itm.match(embeds, [position[i] for i in rows], texts, batch_size=text_batch_size)
    for (i, j), value in zip(slots, scores):
        out[i][j] = value
    return out, len(texts)
