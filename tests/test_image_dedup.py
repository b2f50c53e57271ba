"""Image near-duplicates: the exact faiss search, the SemDeDup-style partitioned search at scale,
and the thumbnail check."""

import numpy as np
import pytest
from PIL import Image

from capfilt.pipelines.config import DedupSettings
from capfilt.pipelines.image_dedup import candidate_pairs
from capfilt.udfs.image_dedup import (boundary_margin, embedding_matrix, nearest_centroids, near_pairs,
                              pixels_match, thumbnails)
from capfilt.world.embeddings import planted_embeddings
from helpers import encoded


def brute_force(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_exact_search_returns_every_pair_over_the_threshold_and_no_other():
    x = planted_embeddings(3000, 32, topics=20, dup_share=0.2, seed=1)
    i, j, cosine = near_pairs(x, 0.95, block=700)  # several query blocks
    assert set(zip(i.tolist(), j.tolist())) == brute_force(x, 0.95)
    assert np.allclose(cosine, (x[i] * x[j]).sum(1), atol=1e-5)
    assert len(i) > 300


def test_a_row_near_the_boundary_goes_to_both_partitions():
    centroids = np.eye(3, dtype=np.float32)
    inside = np.array([[0.99, 0.1, 0.0]], np.float32)
    between = np.array([[0.71, 0.70, 0.0]], np.float32)
    x = np.concatenate([inside, between])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    first, second = nearest_centroids(x, centroids, 0.95)
    assert first.tolist() == [0, 0] and second.tolist() == [-1, 1]
    # The bound: cosine >= t means distance <= sqrt(2 - 2t), shared by the two rows.
    assert boundary_margin(0.95) == pytest.approx(np.sqrt(0.1) / 2)


def _as_rows(spark, x: np.ndarray):
    blobs = [row.astype("<f2").tobytes() for row in x]
    return spark.createDataFrame([(f"u{i:06d}", b) for i, b in enumerate(blobs)], "uid string, image_embedding binary")


@pytest.mark.slow
def test_partitioned_search_finds_the_pairs_of_the_exact_search(spark):
    """k-means partitions with boundary double-assignment against brute force on the same fp16
    embeddings: every pair found is a true pair, and recall is >= 0.98 (bench/dedup_images.py
    measures it at 50k)."""
    x = planted_embeddings(4000, 48, topics=60, dup_share=0.25, seed=2)
    rows = _as_rows(spark, x)
    truth = brute_force(embedding_matrix(r.astype("<f2").tobytes() for r in x), 0.95)
    settings = DedupSettings(image_threshold=0.95, exact_search_rows=1000, partition_rows=500, kmeans_sample=4000)
    found = {(int(a[1:]), int(b[1:])) for a, b, _ in candidate_pairs(rows, settings, seed=0).collect()}
    assert found <= truth
    assert len(found) / len(truth) >= 0.98, (len(found), len(truth))
    assert len(truth) > 500
    exact = DedupSettings(image_threshold=0.95, exact_search_rows=10_000)
    assert {(int(a[1:]), int(b[1:])) for a, b, _ in candidate_pairs(rows, exact).collect()} == truth


def test_thumbnails_match_a_re_encoded_resized_copy_but_not_another_picture():
    rng = np.random.default_rng(3)
    base = Image.fromarray(np.kron(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8)))
    copy = base.resize((96, 96)).resize((128, 128))
    other = Image.fromarray(np.roll(np.asarray(base), 16, axis=1))
    a = thumbnails([encoded(base, quality=95), encoded(base, quality=95)])
    b = thumbnails([encoded(copy, quality=70), encoded(other, quality=95)])
    defaults = DedupSettings()
    assert pixels_match(a, b, defaults.pixel_tolerance, defaults.pixel_max_changed).tolist() == [True, False]
