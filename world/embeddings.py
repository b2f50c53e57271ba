"""Synthetic image embeddings with planted near-duplicates: data for the image-dedup search at sizes
the shapes world's small CLIP would take long to encode (tests/test_image_dedup.py, bench/dedup_images.py)."""
import numpy as np


def planted_embeddings(n: int, dim: int, topics: int, dup_share: float, seed: int) -> np.ndarray:
    """Unit rows in topic clusters (so k-means partitions have boundaries that pairs straddle), with
    near-duplicates planted at cosines spread over 0.93..0.999 around a 0.95 threshold."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    n_dup = int(n * dup_share)
    originals = centres[rng.integers(0, topics, n - n_dup)] + 0.9 * rng.standard_normal((n - n_dup, dim))
    originals /= np.linalg.norm(originals, axis=1, keepdims=True)
    cosine = rng.uniform(0.93, 0.999, n_dup)
    eps = np.sqrt((1 / cosine**2 - 1) / dim)[:, None]  # E|noise|^2 = eps^2 dim
    copies = originals[rng.integers(0, len(originals), n_dup)] + eps * rng.standard_normal((n_dup, dim))
    x = np.concatenate([originals, copies])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
