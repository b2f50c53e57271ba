"""Near-duplicate images, free of Spark: the bodies of the image dedup UDFs (numpy, faiss, PIL).

    embedding_matrix   float16 embedding bytes -> float32 rows, renormalised
    near_pairs         every pair (i < j) with cosine >= threshold: exact faiss range search
    nearest_centroids  each row's nearest centroid, and its second when the row lies near the boundary
                       between the two (SemDeDup-style partitions that do not lose split pairs)
    thumbnails         side x side RGB thumbnails (box filter) of encoded images
    pixels_match       two thumbnails differ in at most a share of cells: the confirmation of a pair

Embeddings alone cannot decide: a small CLIP calls different scenes near-identical (cosine 0.997 for
a yellow cross vs a yellow circle), and a real CLIP calls two photos of one subject close. A pair
counts when its thumbnails agree too; thumbnails make images of different sizes comparable, and the
box filter averages away re-encoding noise.
"""
from __future__ import annotations

import math

import numpy as np

THUMBNAIL_SIDE = 32


def set_threads(threads: int) -> None:
    """faiss (OpenMP) threads for this process. A Spark task owns spark.task.cpus cores, not the
    machine: faiss's default (every core) oversubscribes when several tasks run side by side."""
    import faiss
    if threads > 0 and faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)


def embedding_matrix(blobs) -> np.ndarray:
    """(n, d) float32 rows from float16 little-endian embedding bytes, each renormalised to length 1
    (fp16 rounding moves an exact copy's cosine to 0.9998-1.0002). A zero or missing embedding
    becomes a zero row: cosine 0 with everything, never a duplicate."""
    blobs = list(blobs)
    sizes = {len(b) for b in blobs if b is not None and len(b)}
    if len(sizes) > 1:
        raise ValueError(f"image embeddings of different lengths in one batch: {sorted(sizes)} bytes")
    dim = sizes.pop() // 2 if sizes else 0
    out = np.zeros((len(blobs), dim), np.float32)
    for row, blob in enumerate(blobs):
        if blob is not None and len(blob):
            out[row] = np.frombuffer(blob, dtype="<f2")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def near_pairs(embeddings: np.ndarray, threshold: float, threads: int = 1,
               block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for every pair of rows i < j whose cosine (inner product of unit rows) is >=
    threshold: exact, one faiss IndexFlatIP and a range search, queried `block` rows at a time so the
    result buffers stay small. Sorted by (i, j)."""
    import faiss
    set_threads(threads)
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2 or x.shape[1] == 0:
        return empty
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # faiss keeps inner products strictly above the radius; one float32 step down keeps ties.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    parts = []
    for start in range(0, n, block):
        lims, sims, ids = index.range_search(x[start:start + block], radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = (ids > rows) & (sims >= np.float32(threshold))
        parts.append((rows[keep], ids[keep].astype(np.int64), sims[keep]))
    if not parts:
        return empty
    i, j, cosine = (np.concatenate(p) for p in zip(*parts))
    order = np.lexsort((j, i))
    return i[order], j[order], cosine[order].astype(np.float32)


def boundary_margin(threshold: float) -> float:
    """Largest distance between two unit vectors with cosine >= threshold, sqrt(2 - 2t), halved:
    a pair split between two partitions has a member this close to their boundary (see
    nearest_centroids)."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * threshold)) / 2


def nearest_centroids(embeddings: np.ndarray, centroids: np.ndarray, threshold: float,
                      threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(first, second): each row's nearest centroid by inner product, and its second nearest when the
    row lies near the boundary between the two, else -1.

    The rule: for a pair a, b (cosine >= t) whose nearest centroids c1 != c2 differ,
    (a.c1 - a.c2) + (b.c2 - b.c1) = (a - b).(c1 - c2) <= |a - b| |c1 - c2| <= sqrt(2 - 2t) |c1 - c2|,
    so one of the two has a gap to the other's centroid of at most sqrt(2 - 2t) |c1 - c2| / 2: the
    distance from the row to the c1|c2 bisector is at most boundary_margin(t). A row whose gap to its
    second centroid is within that bound also goes to the second partition, so every split pair
    meets in one partition, except when the other's centroid is the row's third or later nearest.
    A row is in at most two partitions: the search costs at most twice the single assignment."""
    import faiss
    set_threads(threads)
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if len(c) == 1:
        return np.zeros(len(x), np.int64), np.full(len(x), -1, np.int64)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sims, ids = index.search(x, 2)
    first, second = ids[:, 0].astype(np.int64), ids[:, 1].astype(np.int64)
    spread = np.linalg.norm(c[first] - c[second], axis=1)
    near = (sims[:, 0] - sims[:, 1]) <= boundary_margin(threshold) * spread
    return first, np.where(near, second, -1)


def thumbnail(data: bytes | None, side: int = THUMBNAIL_SIDE) -> np.ndarray | None:
    """(side, side, 3) uint8 thumbnail of encoded image bytes (decoded and normalised as for the
    models: RGB, upright, first frame; box filter), or None when the bytes do not decode."""
    from PIL import Image

    from capfilt.udfs.images import thumbnail_image
    image = thumbnail_image(data, side, Image.Resampling.BOX)
    return None if image is None else np.asarray(image, dtype=np.uint8)


def thumbnails(image_bytes_list, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """(n, side, side, 3) uint8 thumbnails; an image that does not decode gets an all-zero one
    (use `thumbnail` to tell it apart)."""
    items = [thumbnail(data, side) for data in image_bytes_list]
    out = np.zeros((len(items), side, side, 3), np.uint8)
    for row, item in enumerate(items):
        if item is not None:
            out[row] = item
    return out


def changed_share(thumbs_a: np.ndarray, thumbs_b: np.ndarray, tolerance: int) -> np.ndarray:
    """Per pair, the share of thumbnail cells where some channel differs by more than tolerance."""
    a = np.asarray(thumbs_a, dtype=np.int16)
    b = np.asarray(thumbs_b, dtype=np.int16)
    changed = np.abs(a - b).max(axis=-1) > tolerance
    return changed.reshape(len(changed), -1).mean(axis=1)


def pixels_match(thumbs_a: np.ndarray, thumbs_b: np.ndarray, tolerance: int, max_changed: float) -> np.ndarray:
    """Per pair, whether the thumbnails agree: a share of changed cells at most max_changed."""
    return changed_share(thumbs_a, thumbs_b, tolerance) <= max_changed
