"""The decontaminate stage: scored -> scored (+ rejects). Copies of evaluation images leave the data.

`decontaminate.sets` names evaluation image sets, each a folder of image files, Parquet with image bytes
(a `key`/`id` column and an `image` column, or Hugging Face's image struct), or a folder of WebDataset
tars. Every evaluation image is embedded as the pipeline embeds its own rows (the download stage's
resizer, then the run's CLIP: udfs/decontaminate.py). A row leaves as `eval_contaminated` when its
sha256 equals an evaluation file's (an exact copy), or when its stored image embedding lies within
`decontaminate.threshold` (cosine) of an evaluation image's (faiss, exact inner-product search) and the
pixels confirm it (udfs/decontaminate.py: copy_residual; `decontaminate.verify`). The detail names the
evaluation item (`<set>/<id>`) and the evidence. DataComp removes near-duplicates of its
evaluation sets the same way (datacomp#70).
"""
from __future__ import annotations

import pandas as pd  # module level: Spark reads the pandas UDFs' type hints from these globals

from capfilt.pipelines.image_sets import check_sets, embed_sets, sets_digest
from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import SCORED

STAGE = "decontaminate"
EVAL_CONTAMINATED = "eval_contaminated"
REASONS = {EVAL_CONTAMINATED: "a copy of an evaluation image (detail: the evaluation item, and identical bytes "
                              "or the embedding cosine)"}


def check(cfg, input_root: str | None = None) -> None:
    """On the driver, before Spark: the rows' embeddings come from this run's CLIP, that CLIP loads, and
    every evaluation set can be read (a curate run reaches this stage after download, caption and filter)."""
    from capfilt.pipelines.heads import clip_of_input
    from capfilt.udfs.models import check_reference
    if not cfg.decontaminate.sets:
        raise ValueError("decontaminate.sets is empty: name the evaluation sets to decontaminate against")
    same_clip(clip_of_input(input_root) if input_root else None, cfg)
    check_reference(cfg.filter.model, "clip")
    check_sets(cfg.decontaminate.sets, "decontaminate.sets")


def same_clip(clip: str | None, cfg) -> None:
    from capfilt.udfs.heads import same_reference
    if clip is not None and not same_reference(clip, cfg.filter.model):
        raise ValueError(f"the stored embeddings come from {clip} (the filter stage's CLIP), this run's filter.model "
                         f"is {cfg.filter.model}: images given must be embedded by the same model")


def stored_settings(chain, cfg):
    """The download settings the rows' images were stored with (the download manifest's), so that an
    evaluation image is resized as its copy in the data was."""
    import dataclasses

    from capfilt.pipelines.config import DownloadSettings, build
    from capfilt.pipelines.output import read_manifest
    recorded = read_manifest(chain.images).get("config", {}).get("download")
    if not isinstance(recorded, dict):
        return cfg.download
    known = {f.name for f in dataclasses.fields(DownloadSettings)}
    return build(DownloadSettings, {k: v for k, v in recorded.items() if k in known}, "download")


def split(rows, cfg, context) -> Result:
    from pyspark.sql import functions as F

    from capfilt.pipelines.heads import clip_of
    same_clip(clip_of(context.chain), cfg)
    spark = rows.sparkSession
    folder = f"{context.workdir}/eval"
    report = {"eval_sets": {"sets": list(cfg.decontaminate.sets), "threshold": cfg.decontaminate.threshold,
                            "clip": cfg.filter.model,
                            **embed_sets(spark, cfg.decontaminate.sets, "decontaminate.sets", cfg.filter, folder,
                                         stored_settings(context.chain, cfg))}}
    print(f"[{STAGE}] evaluation images: {report['eval_sets']['images']} embedded, "
          f"{report['eval_sets']['unreadable']} unreadable", flush=True)
    hashes = F.broadcast(spark.read.parquet(folder).select(F.col("sha256").alias("_eval_sha"),
                                                           F.col("eval_id").alias("_exact")).dropDuplicates(["_eval_sha"]))
    settings = cfg.decontaminate

    def nearest(embeddings: pd.Series) -> pd.DataFrame:
        from capfilt.udfs.decontaminate import nearest_eval
        ids, cosines = nearest_eval(embeddings.tolist(), folder, settings.candidates, settings.threshold)
        return pd.DataFrame({"ids": ids, "cosines": cosines})
    found = F.pandas_udf(nearest, "ids array<string>, cosines array<float>")
    marked = (rows.join(hashes, rows["sha256"] == hashes["_eval_sha"], "left").drop("_eval_sha")
              .withColumn("_near", found("image_embedding")).localCheckpoint())
    if settings.verify == "pixels":
        def confirm(images: pd.Series, candidates: pd.Series) -> pd.DataFrame:
            from capfilt.udfs.decontaminate import confirm_copies
            ids, residuals = confirm_copies(images.tolist(), [list(c) if c is not None else [] for c in candidates],
                                            folder, settings.pixel_tolerance)
            return pd.DataFrame({"eval_id": ids, "residual": residuals})
        confirmed = F.pandas_udf(confirm, "eval_id string, residual float")
        # Image bytes are read from the download, for the rows with a candidate only.
        images = context.images()
        candidates = marked.filter(F.col("_exact").isNull() & (F.size("_near.ids") > 0)).select("uid", "_near")
        checked = (candidates.join(images.select("uid", "image"), "uid")
                   .select("uid", confirmed("image", "_near.ids").alias("_copy")).localCheckpoint())
        marked = marked.join(checked, "uid", "left")
        copy_of = F.col("_copy.eval_id")
        how = F.concat(F.lit(": pixels within "), F.format_number("_copy.residual", 1), F.lit(" of it, cosine "),
                       F.format_number(F.element_at("_near.cosines", F.array_position("_near.ids", copy_of).cast("int")), 4))
    else:
        copy_of = F.element_at("_near.ids", 1)
        how = F.concat(F.lit(": cosine "), F.format_number(F.element_at("_near.cosines", 1), 4))
    hit = F.col("_exact").isNotNull() | copy_of.isNotNull()
    detail = F.when(F.col("_exact").isNotNull(), F.concat(F.lit("eval item "), "_exact", F.lit(": identical bytes (sha256)"))) \
        .otherwise(F.concat(F.lit("eval item "), copy_of, how))
    kept = marked.filter(~hit).select(*rows.columns)
    return Result(kept, reject_rows(marked.filter(hit), STAGE, EVAL_CONTAMINATED, detail), report)


DEFINITION = Stage(name=STAGE, reads=SCORED, adds=(), reasons=REASONS, split=split, check=check, images=True,
                   help="drop copies of evaluation images (decontaminate.sets)",
                   # the evaluation images are stored as the rows' were
                   depends=("download.image_size", "download.resize_mode", "download.resize_only_if_bigger",
                            "download.encode_format", "download.encode_quality"),
                   enabled=lambda cfg: bool(cfg.decontaminate.sets),
                   inputs=lambda cfg: {"decontaminate.sets": sets_digest(cfg.decontaminate.sets)},
                   models=lambda cfg: {"clip": cfg.filter.model})
