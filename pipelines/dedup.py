"""The dedup stage: scored -> curated (+ rejects). Evidence from three detectors, one policy.

    exact      rows whose image bytes are identical (sha256)
    images     near-duplicate images: faiss on the filter's image embeddings, confirmed on
               thumbnails (capfilt.pipelines.image_dedup)
    captions   near-duplicate web captions: MinHash-LSH identical to datasketch
               (capfilt.pipelines.caption_dedup) proposes, the exact shingle Jaccard confirms; a caption
               pair counts only when the two images are also similar (cosine >= caption_image_threshold)
               and their thumbnails agree, as for image pairs: a generic alt-text ("image", "A flower.")
               under two different pictures is not a duplicate

Every piece of evidence is an edge between two rows; the connected components of all edges are
the duplicate groups. Up to `driver_max_rows` rows (and `exact_search_rows`), the evidence columns
are collected once and the same detectors run on the driver: the same groups, without the Spark
jobs of each step (seconds each at small sizes). Each group keeps one survivor, chosen
deterministically (best caption score, then the larger image, then the lowest uid); the others go
to rejects with the reason that links them to the group and `duplicate_of` = the survivor.
docs/dedup.md gives the policy and its reasons.
"""
from __future__ import annotations

import pandas as pd

from capfilt.pipelines.config import DedupSettings
from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import SCORED, Field

STAGE = "dedup"
EXACT_DUPLICATE, DUPLICATE_IMAGE = "exact_duplicate", "duplicate_image"
NEAR_DUPLICATE_IMAGE, NEAR_DUPLICATE_CAPTION = "near_duplicate_image", "near_duplicate_caption"
CAPTION_CLUSTER_CAP = "caption_cluster_cap"
REASONS = {
    EXACT_DUPLICATE: "the same image bytes (sha256) and the same normalised web caption as the survivor",
    DUPLICATE_IMAGE: "the same image bytes (sha256) as the survivor, under another caption",
    NEAR_DUPLICATE_IMAGE: "a near-duplicate image of a row in its group (embedding cosine >= "
                            "image_threshold, confirmed on thumbnails)",
    NEAR_DUPLICATE_CAPTION: "a near-duplicate web caption (MinHash-LSH) of a row in its group, whose image "
                              "is similar too (cosine >= caption_image_threshold, confirmed on thumbnails)",
    CAPTION_CLUSTER_CAP: "its caption cluster already has max_per_caption_cluster rows",
}
EDGE_KINDS = ("exact", "image", "caption")


def _normalise(captions: pd.Series) -> pd.Series:
    from capfilt.udfs.minhash import normalise_caption
    return captions.map(lambda c: None if c is None else normalise_caption(c))


def _normalised_caption():
    from pyspark.sql.functions import pandas_udf
    return pandas_udf(_normalise, "string")


def exact_edges(df):
    """(src, dst): every row to the smallest uid with the same image bytes (a star per group)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    first = F.min("uid").over(Window.partitionBy("sha256"))
    return (df.select("uid", first.alias("first")).filter(F.col("uid") != F.col("first"))
            .select(F.col("first").alias("src"), F.col("uid").alias("dst")))


def _caption_pair_search(settings: DedupSettings):
    """cluster frame (uid, caption, image_embedding) -> (uid_a, uid_b, cosine), see caption_image_pairs."""
    kind, n = settings.shingle, settings.ngram
    jaccard_min, cosine_min = settings.caption_threshold, settings.caption_image_threshold

    def search(frame: pd.DataFrame) -> pd.DataFrame:
        import numpy as np

        from capfilt.udfs.image_dedup import embedding_matrix, near_pairs
        from capfilt.udfs.minhash import shingles
        frame = frame.sort_values("uid", kind="stable").reset_index(drop=True)
        i, j, cosine = near_pairs(embedding_matrix(frame["image_embedding"].tolist()), cosine_min)
        sets = [set(shingles(c, kind, n)) for c in frame["caption"]]
        similar = np.array([len(sets[a] & sets[b]) >= jaccard_min * len(sets[a] | sets[b]) > 0
                            for a, b in zip(i, j)], dtype=bool)
        uids = frame["uid"].to_numpy()
        return pd.DataFrame({"uid_a": uids[i[similar]], "uid_b": uids[j[similar]],
                             "cosine": cosine[similar].astype("float32")})
    return search


def caption_image_pairs(df, clusters, settings: DedupSettings):
    """(uid_a, uid_b, cosine) within each near-duplicate caption cluster: pairs whose captions' exact
    shingle Jaccard is >= caption_threshold (LSH buckets only propose candidates, and a cluster
    chains them) and whose images' cosine is >= caption_image_threshold. Exact search inside the
    cluster: a template shared by many rows is one group. Candidates: duplicate_groups confirms them
    on thumbnails with the image pairs."""
    rows = df.select("uid", "caption", "image_embedding").join(clusters, "uid")
    return rows.groupBy("cluster").applyInPandas(_caption_pair_search(settings),
                                                 "uid_a string, uid_b string, cosine float")


def _groups_on_the_driver(df, settings: DedupSettings, images):
    """duplicate_groups' result from one collect of the evidence columns, for inputs small enough
    to hold on the driver: the same detectors (the exact image search, MinHash-LSH buckets, the
    caption-image check, thumbnails for both kinds of pair) and the same components, without a Spark
    job per step."""
    import numpy as np
    from pyspark.sql import functions as F

    from capfilt.pipelines.caption_dedup import lsh_bands
    from capfilt.pipelines.components import union_find
    from capfilt.pipelines.image_dedup import _search
    from capfilt.udfs.image_dedup import pixels_match, thumbnail
    from capfilt.udfs.minhash import DEFAULT_SEED, band_keys, minhash_signatures, shingles

    spark = df.sparkSession
    rows = df.select("uid", "sha256", "image_embedding", "caption").toPandas()
    rows = rows.sort_values("uid", kind="stable").reset_index(drop=True)
    edges: list[tuple[str, str, str]] = []
    if settings.exact:
        first = rows.groupby("sha256", dropna=False)["uid"].transform("min")
        edges += [(a, b, "exact") for a, b in zip(first, rows["uid"]) if a != b]
    candidates = []  # (uid_a, uid_b, cosine, kind): image and caption pairs, confirmed together below
    if settings.images:
        pairs = _search(settings.image_threshold)(rows[rows["image_embedding"].notna()])
        candidates.append(pairs.assign(kind="image"))
    clusters = None
    if settings.captions:
        bands, per_band = lsh_bands(settings)
        sig, has = minhash_signatures([shingles(c, settings.shingle, settings.ngram) for c in rows["caption"]],
                                      settings.num_perm, DEFAULT_SEED)
        keep = np.flatnonzero(has)
        buckets: dict = {}
        for row, keys in zip(keep, band_keys(sig[keep], bands, per_band)):
            for band, key in enumerate(keys):
                buckets.setdefault((band, key.tobytes()), []).append(rows["uid"][row])
        cluster_of = union_find((members[0], uid) for members in buckets.values() for uid in members[1:])
        clusters = spark.createDataFrame(sorted(cluster_of.items()), "uid string, cluster string")
        in_clusters = rows[rows["uid"].isin(cluster_of)].assign(cluster=lambda f: f["uid"].map(cluster_of))
        search = _caption_pair_search(settings)
        candidates += [search(frame).assign(kind="caption") for _, frame in in_clusters.groupby("cluster")]
    pairs = pd.concat(candidates, ignore_index=True) if candidates else pd.DataFrame(columns=["uid_a", "uid_b", "kind"])
    if settings.image_verify != "none" and len(pairs):
        members = spark.createDataFrame([(u,) for u in set(pairs.uid_a) | set(pairs.uid_b)], "uid string")
        source = (df if images is None else images).select("uid", "image").join(F.broadcast(members), "uid")
        thumbs = {r.uid: thumbnail(r.image) for r in source.collect()}
        ok = [thumbs.get(a) is not None and thumbs.get(b) is not None for a, b in zip(pairs.uid_a, pairs.uid_b)]
        pairs = pairs[ok]
        if len(pairs):
            keep = pixels_match(np.stack([thumbs[a] for a in pairs.uid_a]), np.stack([thumbs[b] for b in pairs.uid_b]),
                                settings.pixel_tolerance, settings.pixel_max_changed)
            pairs = pairs[keep]
    edges += list(zip(pairs.uid_a, pairs.uid_b, pairs.kind))
    group_of = union_find((a, b) for a, b, _ in edges)
    kinds: dict = {}
    for a, b, kind in edges:
        kinds.setdefault(a, set()).add(kind)
        kinds.setdefault(b, set()).add(kind)
    groups = spark.createDataFrame([(uid, group, sorted(kinds[uid])) for uid, group in sorted(group_of.items())],
                                   "uid string, group string, kinds array<string>")
    return groups, clusters


def duplicate_groups(df, settings: DedupSettings, seed: int = 0, images=None, rows: int | None = None):
    """(uid, group, kinds) for every row with at least one duplicate edge, and the caption clusters
    (uid, cluster) for the per-cluster cap. `kinds` lists the edge kinds that touch the row. `rows`:
    df's row count when the caller knows it (else it is counted)."""
    from pyspark.sql import functions as F

    from capfilt.pipelines.caption_dedup import caption_clusters
    from capfilt.pipelines.components import connected_components

    if settings.captions:
        # Only web captions the filter kept are evidence: a dropped one no longer describes the pair.
        web_kept = F.exists("candidates", lambda c: (c["source"] == "web") & c["kept"])
        df = df.withColumn("caption", F.when(web_kept, F.col("caption")))
    small = min(settings.driver_max_rows, settings.exact_search_rows)
    if settings.driver_max_rows and (df.count() if rows is None else rows) <= small:
        return _groups_on_the_driver(df, settings, images)
    edges = []
    if settings.exact:
        edges.append(exact_edges(df).withColumn("kind", F.lit("exact")))
    candidates = []  # image and caption pairs, confirmed on thumbnails together
    if settings.images:
        from capfilt.pipelines.image_dedup import candidate_pairs
        candidates.append(candidate_pairs(df, settings, seed).withColumn("kind", F.lit("image")))
    clusters = None
    if settings.captions:
        clusters = caption_clusters(df, settings).localCheckpoint()
        candidates.append(caption_image_pairs(df, clusters, settings).withColumn("kind", F.lit("caption")))
    if candidates:
        from capfilt.pipelines.image_dedup import confirm
        pairs = candidates[0] if len(candidates) == 1 else candidates[0].unionByName(candidates[1])
        pairs = pairs.localCheckpoint()  # the searches run once
        if settings.image_verify != "none":
            pairs = confirm(df if images is None else images, pairs, settings)
        edges.append(pairs.select(F.col("uid_a").alias("src"), F.col("uid_b").alias("dst"), "kind"))
    if not edges:
        spark = df.sparkSession
        return (spark.createDataFrame([], "uid string, group string, kinds array<string>"), clusters)
    all_edges = edges[0]
    for more in edges[1:]:
        all_edges = all_edges.unionByName(more)
    all_edges = all_edges.localCheckpoint()  # the detectors run once; components and kinds both read it
    components = connected_components(all_edges.select("src", "dst"))
    ends = all_edges.select(F.col("src").alias("uid"), "kind").unionByName(
        all_edges.select(F.col("dst").alias("uid"), "kind"))
    kinds = ends.groupBy("uid").agg(F.array_sort(F.collect_set("kind")).alias("kinds"))
    groups = (components.select(F.col("node").alias("uid"), F.col("component").alias("group"))
              .join(kinds, "uid"))
    return groups.localCheckpoint(), clusters


def _survivor_order():
    from pyspark.sql import functions as F
    return [F.col("best_score").desc_nulls_last(), (F.col("width").cast("long") * F.col("height")).desc(),
            F.col("uid").asc()]


def dedup(df, settings: DedupSettings, seed: int = 0, images=None, rows: int | None = None):
    """(curated records, rejects) from scored records; `images` (uid, image) when df has no image bytes;
    `rows`: df's row count when known."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    groups, clusters = duplicate_groups(df, settings, seed, images, rows)
    normalise = _normalised_caption()
    ranked = (df.join(groups, "uid", "left")
              .withColumn("rank", F.when(F.col("group").isNull(), F.lit(1))
                          .otherwise(F.row_number().over(Window.partitionBy("group").orderBy(*_survivor_order()))))
              .withColumn("survivor", F.when(F.col("group").isNull(), F.col("uid")).otherwise(
                  F.first("uid").over(Window.partitionBy("group").orderBy(*_survivor_order()))))
              .withColumn("group_size", F.count("*").over(Window.partitionBy("group"))))
    survivor_facts = ranked.filter(F.col("rank") == 1).select(
        F.col("uid").alias("survivor"), F.col("sha256").alias("survivor_sha256"),
        normalise(F.col("caption")).alias("survivor_caption"))
    ranked = ranked.join(survivor_facts, "survivor", "left").localCheckpoint()

    dropped = ranked.filter(F.col("rank") > 1)
    same_image = F.col("sha256") == F.col("survivor_sha256")
    reason = (F.when(same_image & (normalise(F.col("caption")).eqNullSafe(F.col("survivor_caption"))),
                     F.lit(EXACT_DUPLICATE))
              .when(same_image, F.lit(DUPLICATE_IMAGE))
              .when(F.array_contains("kinds", "image") | F.array_contains("kinds", "exact"),
                    F.lit(NEAR_DUPLICATE_IMAGE))
              .otherwise(F.lit(NEAR_DUPLICATE_CAPTION)))
    duplicate_rejects = reject_rows(
        dropped, STAGE, reason, F.concat(F.lit("group of "), F.col("group_size").cast("string"),
                                         F.lit(" rows; evidence: "), F.array_join("kinds", ", ")),
        F.col("survivor"))

    kept = ranked.filter(F.col("rank") == 1)
    rejects = duplicate_rejects
    if clusters is not None and settings.max_per_caption_cluster > 0:
        in_cluster = kept.join(clusters, "uid", "left")
        order = Window.partitionBy("cluster").orderBy(*_survivor_order())
        in_cluster = (in_cluster.withColumn("cluster_rank", F.row_number().over(order))
                      .withColumn("cluster_first", F.first("uid").over(order)))
        capped = F.col("cluster").isNotNull() & (F.col("cluster_rank") > settings.max_per_caption_cluster)
        rejects = rejects.unionByName(reject_rows(
            in_cluster.filter(capped), STAGE, CAPTION_CLUSTER_CAP,
            f"caption cluster keeps {settings.max_per_caption_cluster} rows", F.col("cluster_first")))
        kept = in_cluster.filter(~capped).drop("cluster", "cluster_rank", "cluster_first")

    if settings.inherit_captions:
        kept = _inherit(kept, dropped)
    curated = kept.drop("group", "kinds", "rank", "group_size", "survivor", "survivor_sha256", "survivor_caption",
                        "synthetic_captions")
    return curated, rejects


def _inherit(kept, dropped):
    """Append the kept captions of each survivor's dropped rows to its candidates (source
    'inherited_web' / 'inherited_synthetic', score as measured on the dropped row's image), skipping
    texts the survivor already has (compared lower-cased, whitespace collapsed)."""
    from pyspark.sql import functions as F
    gifts = (dropped.select("survivor", F.explode("candidates").alias("c")).filter(F.col("c.kept"))
             .select("survivor", F.col("c").withField("source", F.concat(F.lit("inherited_"), F.col("c.source")))
                     .alias("c"))
             .groupBy("survivor").agg(F.array_sort(F.collect_list("c")).alias("gifts")))
    joined = kept.join(gifts.withColumnRenamed("survivor", "uid"), "uid", "left")
    def key(text):
        return F.lower(F.trim(F.regexp_replace(text, r"\s+", " ")))
    own = F.transform("candidates", lambda c: key(c["text"]))
    new = F.filter(F.coalesce("gifts", F.array()), lambda g: ~F.array_contains(own, key(g["text"])))
    # One copy per text among the gifts (two dropped rows may share a caption).
    distinct = F.filter(new, lambda g, i: ~F.exists(F.slice(new, 1, i), lambda h: key(h["text"]) == key(g["text"])))
    return joined.withColumn("candidates", F.concat("candidates", distinct)).drop("gifts")


def split(view, cfg, context) -> Result:
    """The stage's split: image bytes for the thumbnail check are read from the download, for the
    rows in candidate pairs only. A survivor's candidates are written only when it inherited some
    (null: the filter's stand)."""
    from pyspark.sql import functions as F
    curated, rejects = dedup(view.withColumn("_own", F.size("candidates")), cfg.dedup, cfg.seed, context.images(),
                             context.rows)
    changed = F.when(F.size("candidates") > F.col("_own"), F.col("candidates"))
    return Result(curated.withColumn("candidates", changed).drop("_own"), rejects)


DEFINITION = Stage(name=STAGE, reads=SCORED, reasons=REASONS, split=split, depends=("seed",), images=True,
                   help="drop exact and near-duplicate pairs; write the curated Parquet", adds=(
    Field("candidates", SCORED.field("candidates").type, True, "with inherited captions; null: as the filter left them"),))
