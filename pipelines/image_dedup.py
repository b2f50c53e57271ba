"""Near-duplicate images on Spark: faiss over the filter's image embeddings, confirmed on thumbnails.

    search    up to exact_search_rows rows: one exact faiss range search over all embeddings.
              Above: SemDeDup-style partitions: k-means centroids trained on a sample (the only
              data that reaches the driver), rows assigned on executors to their nearest centroid
              and, near a boundary, to the second (capfilt.udfs.image_dedup.nearest_centroids), exact search
              within each partition.
    confirm   (image_verify: pixels) thumbnails of the rows in candidate pairs only, and pairs
              kept when the thumbnails agree (capfilt.udfs.image_dedup.pixels_match); dedup's
              caption pairs are confirmed here too.
"""
from __future__ import annotations

import math

import pandas as pd  # at module level: pandas UDF type hints are resolved in these globals

from capfilt.pipelines.config import DedupSettings

PAIRS_SCHEMA = "uid_a string, uid_b string, cosine float"


def _search(threshold: float):
    def search(frame: pd.DataFrame) -> pd.DataFrame:
        from capfilt.udfs.image_dedup import embedding_matrix, near_pairs
        frame = frame.sort_values("uid", kind="stable").reset_index(drop=True)
        i, j, cosine = near_pairs(embedding_matrix(frame["image_embedding"]), threshold)
        uids = frame["uid"].to_numpy()
        return pd.DataFrame({"uid_a": uids[i], "uid_b": uids[j], "cosine": cosine})
    return search


def candidate_pairs(df, settings: DedupSettings, seed: int = 0):
    """(uid_a, uid_b, cosine), uid_a < uid_b: image pairs whose embedding cosine >= image_threshold."""
    from pyspark.sql import functions as F

    rows = df.select("uid", "image_embedding").filter(F.col("image_embedding").isNotNull())
    n = rows.count()
    if n <= settings.exact_search_rows:
        return rows.withColumn("partition", F.lit(0)).groupBy("partition").applyInPandas(
            _search(settings.image_threshold), PAIRS_SCHEMA)
    centroids = _centroids(rows, n, settings, seed)
    threshold = settings.image_threshold

    def assign(frames):
        from capfilt.udfs.image_dedup import embedding_matrix, nearest_centroids
        for frame in frames:
            first, second = nearest_centroids(embedding_matrix(frame["image_embedding"]), centroids, threshold)
            both = pd.concat([frame.assign(partition=first), frame.assign(partition=second)[second >= 0]])
            yield both[["uid", "image_embedding", "partition"]]

    assigned = rows.mapInPandas(assign, "uid string, image_embedding binary, partition long")
    return (assigned.groupBy("partition").applyInPandas(_search(threshold), PAIRS_SCHEMA)
            .groupBy("uid_a", "uid_b").agg(F.max("cosine").alias("cosine")))  # a pair met in two partitions


def _centroids(rows, n: int, settings: DedupSettings, seed: int):
    """k-means centroids (k = ceil(n / partition_rows)) trained on a sample of at most kmeans_sample rows."""
    import faiss

    from capfilt.udfs.image_dedup import embedding_matrix
    k = math.ceil(n / settings.partition_rows)
    fraction = min(1.0, settings.kmeans_sample / n)
    sample = rows.sample(fraction=fraction, seed=seed).limit(settings.kmeans_sample).select("image_embedding")
    x = embedding_matrix(r[0] for r in sample.toLocalIterator())
    k = max(1, min(k, len(x)))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    return kmeans.centroids


def confirm(images, pairs, settings: DedupSettings):
    """The candidate pairs (uid_a, uid_b and any other columns, kept) whose 32x32 thumbnails agree.
    Thumbnails are made for the rows that appear in some pair only (`images`: uid and image bytes,
    read where they lie). Dedup confirms its image and its caption pairs here, in one pass."""
    from pyspark.sql import functions as F

    members = pairs.select(F.col("uid_a").alias("uid")).union(pairs.select(F.col("uid_b").alias("uid"))).distinct()
    tolerance, max_changed = settings.pixel_tolerance, settings.pixel_max_changed

    def thumbs(frames):
        from capfilt.udfs.image_dedup import thumbnail
        for frame in frames:
            out = [thumbnail(b) for b in frame["image"]]
            yield pd.DataFrame({"uid": frame["uid"], "thumb": [None if t is None else t.tobytes() for t in out]})

    small = images.select("uid", "image").join(F.broadcast(members), "uid").mapInPandas(thumbs, "uid string, thumb binary")
    joined = (pairs.join(small.select(F.col("uid").alias("uid_a"), F.col("thumb").alias("ta")), "uid_a")
              .join(small.select(F.col("uid").alias("uid_b"), F.col("thumb").alias("tb")), "uid_b"))

    def check(frames):
        import numpy as np

        from capfilt.udfs.image_dedup import THUMBNAIL_SIDE, pixels_match
        shape = (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
        for frame in frames:
            ok = frame["ta"].notna() & frame["tb"].notna()
            frame = frame[ok]
            if frame.empty:
                continue
            a = np.stack([np.frombuffer(t, np.uint8).reshape(shape) for t in frame["ta"]])
            b = np.stack([np.frombuffer(t, np.uint8).reshape(shape) for t in frame["tb"]])
            keep = pixels_match(a, b, tolerance, max_changed)
            yield frame.loc[keep, columns]

    columns = pairs.columns
    return joined.mapInPandas(check, pairs.schema)


def image_pairs(df, settings: DedupSettings, seed: int = 0, images=None):
    """(uid_a, uid_b, cosine): near-duplicate image pairs, confirmed on thumbnails (of `images`, by
    default df) unless image_verify is 'none'."""
    pairs = candidate_pairs(df, settings, seed).localCheckpoint()  # the search runs once
    return pairs if settings.image_verify == "none" else confirm(df if images is None else images, pairs, settings)
