"""The filter stage: captioned -> scored (+ rejects). One CLIP score per caption, then a rule.

    score      (DataFrame -> DataFrame) image embedding + a score for the web and each synthetic caption
    select     (DataFrame -> DataFrame) candidates with `kept` by the configured rule, best_score,
               caption_primary; needs the global cutoff for the percentile rule (`percentile_cutoff`)
    split      scored records (some kept caption) and rejects (`no_aligned_caption`, with the best score)

Persist the output of `score` before computing a cutoff or splitting: each is an action, and
inference must not run twice.
"""
from __future__ import annotations

from capfilt.pipelines.config import FilterSettings
from capfilt.pipelines.stage import OUT, ModelPass, Stage, reject_rows
from capfilt.schemas import CAPTIONED, CURATED, SCORED
from capfilt.udfs.images import IMAGE_TOO_LARGE, UNDECODABLE_IMAGE

STAGE = "filter"
NO_ALIGNED_CAPTION = "no_aligned_caption"
REASONS = {
    NO_ALIGNED_CAPTION: "no candidate caption passed the selection rule (detail: the best score)",
    UNDECODABLE_IMAGE: "the stored image bytes do not decode",
    IMAGE_TOO_LARGE: "the image is over the pixel limit",
}
# What the scores depend on: a change needs a new CLIP pass. The selection settings (rule, threshold,
# top_k, percentile) do not: a rerun that changes only them re-selects from the stored scores.
KEYS = ("filter.model", "filter.device")


def _fields():
    from pyspark.sql import types as T
    return [T.StructField("embedding", T.BinaryType(), True),
            T.StructField("scores", T.ArrayType(T.FloatType()), True)]


class ScoreBatch:
    """The CLIP part of a model pass: an embedding per image, a score per candidate caption."""

    def __init__(self, settings: FilterSettings):
        self.settings = settings

    def __call__(self, frame, images) -> dict:
        import numpy as np

        from capfilt.pipelines.inference import worker_model
        from capfilt.udfs.clip_scores import clip_scores, embedding_bytes
        from capfilt.udfs.models import cached_clip

        s = self.settings
        clip = worker_model(s, cached_clip)
        synthetic = [list(x) if x is not None else [] for x in frame["synthetic_captions"].tolist()]
        embeddings, scores = clip_scores(clip, images, frame["caption"].tolist(), synthetic, s.batch_size)
        return {
            "embedding": [None if image is None else embedding_bytes(embeddings[i]) for i, image in enumerate(images)],
            # NaN (blank web caption) travels as null
            "scores": [None if sc is None else [None if np.isnan(v) else float(v) for v in sc] for sc in scores]}


CLIP = ModelPass(role="clip", reads=("caption", "synthetic_captions"), fields=_fields,
                 batch=lambda cfg: ScoreBatch(cfg.filter), settings=lambda cfg: cfg.filter, keys=KEYS,
                 reference=lambda cfg: cfg.filter.model)


def score(df, settings: FilterSettings):
    """df + the pass struct (error, embedding, scores)."""
    from types import SimpleNamespace

    from capfilt.pipelines.stage import infer
    return infer(df, SimpleNamespace(filter=settings), [CLIP], df.sparkSession.sparkContext.accumulator(0))


def percentile_cutoff(scored, quantile: float) -> float | None:
    """The global quantile of web-caption scores, computed on the cluster (approxQuantile)."""
    from pyspark.sql import functions as F
    web = scored.filter(F.col(f"{OUT}.error").isNull()).select(F.col(f"{OUT}.scores")[0].alias("s")).dropna()
    values = web.approxQuantile("s", [quantile], 1e-4)
    return values[0] if values else None


def select(scored, settings: FilterSettings, cutoff: float | None = None):
    """Candidates (web first, then synthetic) with scores and `kept`, best_score, caption_primary."""
    from pyspark.sql import functions as F

    scores = F.col(f"{OUT}.scores")
    web = F.when(F.col("caption").isNotNull() & (F.trim(F.col("caption")) != ""),
                 F.array(F.struct(F.col("caption").alias("text"), F.lit("web").alias("source"),
                                  scores[0].alias("score")))).otherwise(F.array())
    synthetic = F.transform(F.col("synthetic_captions"), lambda t, i: F.struct(
        t.alias("text"), F.lit("synthetic").alias("source"), scores[i + 1].alias("score")))
    # A column of its own: the rules' lambdas read it many times per row, and an inlined concat would be
    # rebuilt at each read (topk on 9,705 rows: 5 s of interpreted lambdas per write).
    scored = scored.withColumn("_candidates", F.concat(web, synthetic))
    candidates = F.col("_candidates")
    if settings.rule == "topk":
        # Rank among the row's candidates (ties: earlier first); keep the top k above the floor.
        def kept(c, i):
            better = F.size(F.filter(F.sequence(F.lit(0), F.size(candidates) - 1), lambda j: (
                candidates[j]["score"] > c["score"]) | ((candidates[j]["score"] == c["score"]) & (j < i))))
            return (better < settings.top_k) & (c["score"] >= settings.threshold)
    else:
        floor = settings.threshold if settings.rule == "threshold" else cutoff
        if floor is None:
            raise ValueError("the percentile rule needs the cutoff from percentile_cutoff()")

        def kept(c, i):
            return c["score"] >= F.lit(float(floor))
    marked = F.transform(candidates, lambda c, i: F.struct(
        c["text"].alias("text"), c["source"].alias("source"), c["score"].cast("float").alias("score"),
        F.coalesce(kept(c, i), F.lit(False)).alias("kept")))
    kept_sorted = F.array_sort(F.filter(F.col("candidates"), lambda c: c["kept"]),
                               lambda a, b: F.when(a["score"] > b["score"], -1).when(a["score"] < b["score"], 1)
                               .otherwise(0))
    return (scored.withColumn("candidates", marked).drop("_candidates")
            .withColumn("best_score", F.array_max(F.transform("candidates", lambda c: c["score"])).cast("float"))
            .withColumn("caption_primary", F.get(kept_sorted, 0)["text"]))  # null: no kept caption


def split_scored(selected):
    """(scored records, rejects): a row is kept when some candidate is."""
    from pyspark.sql import functions as F

    error = F.col(f"{OUT}.error")
    any_kept = F.exists("candidates", lambda c: c["kept"])
    scored = (selected.filter(error.isNull() & any_kept)
              .withColumn("image_embedding", F.col(f"{OUT}.embedding")).drop(OUT))
    reason = F.when(error.isNotNull(), F.substring_index(error, ":", 1)).otherwise(F.lit(NO_ALIGNED_CAPTION))
    detail = F.when(error.isNotNull(), error).otherwise(
        F.concat(F.lit("best score "), F.format_number(F.coalesce("best_score", F.lit(float("nan"))), 4)))
    rejects = reject_rows(selected.filter(error.isNotNull() | ~any_kept), STAGE, reason, detail)
    return scored, rejects


def split(marked, cfg, facts: dict):
    """The stage's split: the selection rule over every row's stored scores (the percentile cutoff is
    global), then records and rejects."""
    settings = cfg.filter
    cutoff = percentile_cutoff(marked, settings.percentile) if settings.rule == "percentile" else None
    facts["models"]["percentile_cutoff"] = cutoff
    # Computed once: the records and the rejects are two writes of it.
    return split_scored(select(marked, settings, cutoff).localCheckpoint())


DEFINITION = Stage(
    name=STAGE, reads=CAPTIONED, reasons=REASONS, split=split, model=CLIP, keeps_scores=True,
    adds=(*(SCORED.field(n) for n in ("candidates", "best_score")), CURATED.field("caption_primary")),
    from_model={"image_embedding": "embedding"},  # stored once, with every row's scores
    models=lambda cfg: {"clip": cfg.filter.model, "rule": cfg.filter.rule})
