"""Metrics of the shapes-world benchmarks."""

from __future__ import annotations

import numpy as np


def roc_auc(positive_scores, negative_scores) -> float:
    """Probability that a random positive scores above a random negative (ties count half):
    the Mann-Whitney form of the ROC AUC."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(average, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def recall_at_1(image_features, text_features, keys, pool: int) -> dict:
    """Retrieval R@1 of n (image, text) pairs split into n // pool disjoint pools of `pool` pairs,
    in both directions. A hit when the top-ranked item has the query's key: two pairs with the same
    key (the same scene) are indistinguishable, so retrieving either counts."""
    return {direction: float(h.mean()) for direction, h in hits_at_1(image_features, text_features, keys, pool).items()}


def hits_at_1(image_features, text_features, keys, pool: int) -> dict:
    """recall_at_1 per query: {direction: bool array over the pairs in whole pools, in pair order}, so that
    the recall of a subset of the pairs (a concept's) is the mean over its queries."""
    images = np.asarray(image_features, dtype=np.float32)
    texts = np.asarray(text_features, dtype=np.float32)
    keys = np.asarray(keys)
    if len(keys) < pool:
        raise ValueError(f"{len(keys)} pairs are fewer than one pool of {pool}")
    hits = {"image_to_text": [], "text_to_image": []}
    for start in range(0, len(keys) - pool + 1, pool):
        sl = slice(start, start + pool)
        sims = images[sl] @ texts[sl].T
        k = keys[sl]
        hits["image_to_text"].append(k[sims.argmax(axis=1)] == k)
        hits["text_to_image"].append(k[sims.argmax(axis=0)] == k)
    return {direction: np.concatenate(h) for direction, h in hits.items()}
