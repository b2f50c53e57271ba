"""The target stage (DataComp's image-based filter): scored -> scored + target_cluster (+ rejects).

Off unless `target.sets` names images of the task the data is for (a folder, Parquet or WebDataset, as
evaluation sets are given: pipelines/image_sets.py). The stored image embeddings of the rows it reads
(a sample of `target.sample` rows, chosen by a hash of (seed, uid)) are clustered by faiss spherical
k-means into `target.clusters` centroids; each target image, stored and embedded as a row's image is,
keeps its `target.nearest` nearest centroids; a row whose image lies nearest to a centroid no target
image kept leaves as `off_target`. No pool image is decoded and no model runs over the rows: the
embeddings are the filter's. It runs after filter, so a row must pass the filter's rule and the target's
(DataComp-1B's rule: CLIP score ∩ image-based). DataComp clusters the whole pool; here the clusters are
those of the filter's survivors (docs/filters.md).
"""
from __future__ import annotations

import pandas as pd  # module level: Spark reads the pandas UDFs' type hints from these globals

from capfilt.pipelines.image_sets import check_sets, embed_sets, sets_digest
from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import SCORED, Field
from capfilt.schemas.contract import INT32

STAGE = "target"
CLUSTER = Field("target_cluster", INT32, True, "the k-means cluster of the pool its image embedding lies in")
REASONS = {"off_target": "its image lies in a cluster of the pool no target image is nearest to (detail: the "
                         "cluster and how many clusters the target kept)"}
POINTS_PER_CLUSTER = 10  # fewer sampled rows per centroid and k-means has nothing to average: k is capped


def check(cfg, input_root: str | None = None) -> None:
    """On the driver, before Spark: the rows' embeddings come from this run's CLIP, it loads, the sets read."""
    from capfilt.pipelines.decontaminate import same_clip
    from capfilt.pipelines.heads import clip_of_input
    from capfilt.udfs.models import check_reference
    same_clip(clip_of_input(input_root) if input_root else None, cfg)
    check_reference(cfg.filter.model, "clip")
    check_sets(cfg.target.sets, "target.sets")


def centroids(rows, cfg):
    """(unit centroids [k, d], sampled rows): spherical k-means over a seeded sample of the stored embeddings."""
    import faiss
    import numpy as np
    from pyspark.sql import functions as F

    from capfilt.udfs.heads import embeddings_from_bytes
    s = cfg.target
    sample = (rows.filter(F.col("image_embedding").isNotNull())
              .orderBy(F.xxhash64(F.lit(cfg.seed), F.lit(STAGE), F.col("uid")), "uid")
              .limit(s.sample).select("image_embedding").toPandas())
    x = embeddings_from_bytes(sample["image_embedding"])
    x = x[~np.isnan(x).any(axis=1)] if x.size else x
    if not len(x):
        raise ValueError("target: no row has a stored image embedding to cluster")
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    k = max(1, min(s.clusters, len(x) // POINTS_PER_CLUSTER))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=s.iterations, seed=cfg.seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, len(x) // k + 1))
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return kmeans.centroids.copy(), len(x)


def nearest(x, c, n: int = 1):
    """Ids of the n nearest unit centroids of each row of x (by inner product), [rows, n]."""
    import faiss
    import numpy as np
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(np.ascontiguousarray(c, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), min(n, len(c)))[1]


def split(rows, cfg, context) -> Result:
    import numpy as np
    import pyarrow.dataset as ds
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from capfilt.pipelines.decontaminate import same_clip, stored_settings
    from capfilt.pipelines.heads import clip_of
    s = cfg.target
    same_clip(clip_of(context.chain), cfg)
    spark = rows.sparkSession
    folder = f"{context.workdir}/target"
    embedded = embed_sets(spark, s.sets, "target.sets", cfg.filter, folder, stored_settings(context.chain, cfg))
    c, sampled = centroids(rows, cfg)
    table = ds.dataset(folder, format="parquet").to_table(columns=["embedding"], filter=ds.field("embedding").is_valid())
    targets = np.frombuffer(b"".join(table.column("embedding").to_pylist()), dtype="<f4").reshape(-1, c.shape[1])
    chosen = sorted({int(i) for i in nearest(targets, c, s.nearest).ravel() if i >= 0})
    print(f"[{STAGE}] {embedded['images']} target images kept {len(chosen)} of {len(c)} clusters "
          f"(k-means on {sampled:,} rows)", flush=True)
    shipped = spark.sparkContext.broadcast(c)

    def assign(embeddings: pd.Series) -> pd.Series:
        from capfilt.udfs.heads import embeddings_from_bytes
        x = embeddings_from_bytes(embeddings)
        valid = ~np.isnan(x).any(axis=1) if x.size else np.zeros(len(x), bool)
        out = np.full(len(x), -1, dtype=np.int64)
        if valid.any():
            out[valid] = nearest(x[valid], shipped.value)[:, 0]
        return pd.Series([None if i < 0 else int(i) for i in out], dtype="object")
    marked = rows.withColumn(CLUSTER.name, F.pandas_udf(assign, T.IntegerType())("image_embedding")).localCheckpoint()
    on = F.col(CLUSTER.name).isin(chosen)
    detail = F.when(F.col(CLUSTER.name).isNull(), F.lit("no stored image embedding")).otherwise(F.concat(
        F.lit("cluster "), F.col(CLUSTER.name).cast("string"), F.lit(f" of {len(c)}; the target kept {len(chosen)}")))
    kept = marked.filter(on)
    report = {"target": {"sets": list(s.sets), "clusters": len(c), "clusters_asked": s.clusters, "sampled_rows": sampled,
                         "nearest": s.nearest, "target_clusters": len(chosen), **embedded}}
    return Result(kept, reject_rows(marked.filter(~on | F.col(CLUSTER.name).isNull()), STAGE, "off_target", detail),
                  report)


DEFINITION = Stage(name=STAGE, reads=SCORED, adds=(CLUSTER,), reasons=REASONS, split=split, check=check,
                   help="keep rows whose image lies in a pool cluster near the target task's images (DataComp)",
                   # the target images are stored as the rows' were
                   depends=("seed", "download.image_size", "download.resize_mode", "download.resize_only_if_bigger",
                            "download.encode_format", "download.encode_quality"),
                   enabled=lambda cfg: bool(cfg.target.sets), inputs=lambda cfg: {"target.sets": sets_digest(cfg.target.sets)},
                   models=lambda cfg: {"clip": cfg.filter.model})
