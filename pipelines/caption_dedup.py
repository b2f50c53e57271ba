"""Near-duplicate web captions: MinHash-LSH on Spark, bucket for bucket what datasketch finds.

    shingles      capfilt.udfs.minhash.shingles on the normalised caption (word or char n-grams)
    signatures    numpy MinHash equal to datasketch.MinHash(num_perm, seed=1), per Arrow batch
    buckets       (uid, bucket) rows, one per band: the bytes MinHashLSH files the band's bucket
                  under, plus the band index; bands and rows = datasketch's optimal parameters
                  for caption_threshold
    edges         each bucket's members linked to the bucket's smallest uid: a star, never all
                  pairs, so a template caption shared by 100k rows gives 100k edges, not 5e9
    clusters      connected components of the edges (capfilt.pipelines.components)

A caption with no shingles (empty or all whitespace) gets no signature and no bucket: empty captions
are not near-duplicates of each other. Nothing is collected to the driver.
"""
from __future__ import annotations

import pandas as pd  # at module level: the pandas UDF's type hints are resolved in these globals

from capfilt.pipelines.config import DedupSettings
from capfilt.udfs.minhash import DEFAULT_SEED, lsh_params

BUCKETS_SCHEMA = "uid string, bucket binary"


def lsh_bands(settings: DedupSettings) -> tuple[int, int]:
    """(bands, rows) for the settings: datasketch's MinHashLSH(caption_threshold, num_perm) choice."""
    return lsh_params(settings.caption_threshold, settings.num_perm)


def caption_signatures(df, settings: DedupSettings, seed: int = DEFAULT_SEED, column: str = "signature"):
    """df + `column` (array<long>): the caption's MinHash, datasketch's uint32 values, or null for a
    caption without shingles (null, empty or all whitespace)."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    kind, n, num_perm = settings.shingle, settings.ngram, settings.num_perm

    @pandas_udf("array<long>")
    def signature(captions: pd.Series) -> pd.Series:
        from capfilt.udfs.minhash import minhash_signatures, shingles
        sig, has = minhash_signatures([shingles(c, kind, n) for c in captions], num_perm, seed)
        sig = sig.astype("int64")
        return pd.Series([sig[i] if has[i] else None for i in range(len(sig))], dtype=object)

    return df.withColumn(column, signature(F.col("caption")))


def _bucket_rows(kind: str, n: int, num_perm: int, seed: int, bands: int, rows: int):
    """Arrow batches (uid, caption) -> Arrow batches (uid, bucket), one row per band of every
    caption that has shingles. Built from numpy buffers: no Python object per band."""
    if bands >= 1 << 16:
        raise ValueError(f"{bands} LSH bands: at most 65535 fit a bucket id")

    def bucket_rows(batches):
        import numpy as np
        import pyarrow as pa

        from capfilt.udfs.minhash import band_keys, minhash_signatures, shingles
        band_ids = np.arange(bands, dtype=">u2").view(np.uint8).reshape(bands, 2)
        for batch in batches:
            captions = batch.column("caption").to_pylist()
            sig, has = minhash_signatures([shingles(c, kind, n) for c in captions], num_perm, seed)
            keep = np.flatnonzero(has)
            keys = band_keys(sig[keep], bands, rows)  # (kept, bands, width) uint8
            width = keys.shape[2] + 2
            buckets = np.empty((len(keep), bands, width), dtype=np.uint8)
            buckets[:, :, :-2] = keys
            buckets[:, :, -2:] = band_ids
            count = len(keep) * bands
            offsets = np.arange(0, count * width + 1, width, dtype=np.int32)
            bucket = pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(buckets)])
            uid = batch.column("uid").take(pa.array(np.repeat(keep, bands)))
            yield pa.RecordBatch.from_arrays([uid, bucket], names=["uid", "bucket"])
    return bucket_rows


def caption_buckets(df, settings: DedupSettings, seed: int = DEFAULT_SEED):
    """DataFrame(uid, bucket): one row per LSH band of every caption with shingles. bucket = the
    band's key in MinHashLSH (its hash values, big-endian) followed by the band index (2 bytes,
    big-endian): two rows share a MinHashLSH bucket iff their bucket values are equal. The band
    goes last so that the first 8 bytes, which Spark's sort compares first, are hash values."""
    from pyspark.sql import functions as F
    bands, rows = lsh_bands(settings)
    fn = _bucket_rows(settings.shingle, settings.ngram, settings.num_perm, seed, bands, rows)
    return (df.select(F.col("uid").cast("string").alias("uid"), F.col("caption").cast("string").alias("caption"))
            .mapInArrow(fn, BUCKETS_SCHEMA))


def _star_edges(df, settings: DedupSettings, seed: int):
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    first = F.min("uid").over(Window.partitionBy("bucket"))
    keyed = caption_buckets(df, settings, seed).select("uid", first.alias("first"))
    return keyed.filter(F.col("uid") != F.col("first")).select(F.col("first").alias("src"), F.col("uid").alias("dst"))


def caption_edges(df, settings: DedupSettings, seed: int = DEFAULT_SEED):
    """DataFrame(src, dst), distinct: every member of an LSH bucket (dst) linked to the bucket's
    smallest uid (src). Connects the same rows as all pairs within buckets, in one edge per member."""
    return _star_edges(df, settings, seed).distinct()


def candidate_pairs(df, settings: DedupSettings, seed: int = DEFAULT_SEED):
    """DataFrame(uid_a, uid_b), uid_a < uid_b, distinct: every pair that shares at least one LSH
    bucket, i.e. the pairs datasketch's MinHashLSH.query returns. Quadratic in the bucket size: for
    parity checks and small data; the stage uses caption_edges."""
    from pyspark.sql import functions as F
    buckets = caption_buckets(df, settings, seed)
    a = buckets.select(F.col("uid").alias("uid_a"), "bucket")
    b = buckets.select(F.col("uid").alias("uid_b"), "bucket")
    return (a.join(b, "bucket").filter(F.col("uid_a") < F.col("uid_b"))
            .select("uid_a", "uid_b").distinct())


def caption_clusters(df, settings: DedupSettings, seed: int = DEFAULT_SEED, checkpoint_dir: str | None = None):
    """DataFrame(uid, cluster): rows with at least one near-duplicate caption, cluster = the smallest
    uid of their connected component over caption_edges. Rows without one do not appear."""
    from pyspark.sql import functions as F

    from capfilt.pipelines.components import connected_components
    # Not caption_edges: components drop duplicate edges themselves, one shuffle fewer.
    components = connected_components(_star_edges(df, settings, seed), checkpoint_dir=checkpoint_dir)
    return components.select(F.col("node").alias("uid"), F.col("component").alias("cluster"))
