"""The filter stage: captioned -> scored (+ rejects). A score per caption, then a rule.

The scorer (`filter.scorer`): `clip`, the CLIP cosine; `itm`, BLIP's image-text matching probability
(a cross-encoder); `two_step`, CLIP on every caption and the ITM on those at or above `clip_floor`.
CLIP always embeds the image (dedup, decontamination and heads read that embedding), so every
candidate keeps its CLIP score, and its ITM score when the ITM ran.

    score      (DataFrame -> DataFrame) image embedding + scores for the web and each synthetic caption
    select     (DataFrame -> DataFrame) candidates with `kept` by the configured rule, best_score,
               caption_primary; needs the global cutoff for the percentile rule (`percentile_cutoff`)
    split      scored records (some kept caption) and rejects (`no_aligned_caption`, with the best score)

Persist the output of `score` before computing a cutoff or splitting: each is an action, and
inference must not run twice.
"""
from __future__ import annotations

from capfilt.pipelines.config import FilterSettings
from capfilt.pipelines.stage import PASS, ModelPass, Result, Stage, reject_rows
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
KEYS = ("filter.model", "filter.device", "filter.scorer", "filter.itm_model", "filter.clip_floor", "filter.clip_top")


def _fields():
    from pyspark.sql import types as T
    return [T.StructField("embedding", T.BinaryType(), True),
            T.StructField("scores", T.ArrayType(T.FloatType()), True),
            T.StructField("itm_scores", T.ArrayType(T.FloatType()), True),
            # the batch's model seconds, an equal share per row: the sum is each step's cost
            T.StructField("seconds", T.StructType([T.StructField("clip", T.DoubleType(), True),
                                                   T.StructField("itm", T.DoubleType(), True)]), True)]


def _nulls(rows):
    """float32 arrays -> lists with NaN (a blank web caption, a candidate not scored) as null."""
    import numpy as np
    return [None if sc is None else [None if np.isnan(v) else float(v) for v in sc] for sc in rows]


class ScoreBatch:
    """The filter's part of a model pass: a CLIP embedding per image, a CLIP score per candidate
    caption, and with scorer itm or two_step an ITM score per candidate it rescores."""

    def __init__(self, settings: FilterSettings):
        self.settings = settings

    def __call__(self, frame, images) -> dict:
        import time

        from capfilt.udfs.clip_scores import clip_scores, embedding_bytes
        from capfilt.udfs.itm_scores import itm_scores
        from capfilt.udfs.models import cached_clip, cached_itm, worker_model

        s = self.settings
        clip = worker_model(s, cached_clip)
        itm = cached_itm(s.itm_model, None if s.device == "auto" else s.device) if s.scorer != "clip" else None
        synthetic = [list(x) if x is not None else [] for x in frame["synthetic_captions"].tolist()]
        web = frame["caption"].tolist()
        started = time.perf_counter()
        embeddings, scores = clip_scores(clip, images, web, synthetic, s.batch_size)
        clip_seconds = time.perf_counter() - started
        matched, itm_seconds = [None] * len(images), None
        if itm is not None:
            started = time.perf_counter()
            two_step = s.scorer == "two_step"
            matched, _ = itm_scores(itm, images, web, synthetic, scores, s.clip_floor if two_step else None,
                                    s.batch_size, s.itm_batch_size, s.clip_top if two_step else 0)
            itm_seconds = time.perf_counter() - started
        share = 1 / max(len(images), 1)
        return {
            "embedding": [None if image is None else embedding_bytes(embeddings[i]) for i, image in enumerate(images)],
            "scores": _nulls(scores), "itm_scores": _nulls(matched),
            "seconds": [{"clip": clip_seconds * share,
                         "itm": None if itm_seconds is None else itm_seconds * share}] * len(images)}


CLIP = ModelPass(role="clip", reads=("caption", "synthetic_captions"), fields=_fields,
                 batch=lambda cfg: ScoreBatch(cfg.filter), settings=lambda cfg: cfg.filter, keys=KEYS,
                 reference=lambda cfg: cfg.filter.model,
                 more_models=lambda cfg: {"itm": cfg.filter.itm_model} if cfg.filter.scorer != "clip" else {})


def score(df, settings: FilterSettings):
    """df + the pass struct (error, embedding, scores)."""
    from types import SimpleNamespace

    from capfilt.pipelines.stage import infer
    return infer(df, SimpleNamespace(filter=settings), [CLIP], df.sparkSession.sparkContext.accumulator(0))


def rule_scores(settings: FilterSettings) -> str:
    """The pass field holding the scores the selection rule works on."""
    return "scores" if settings.scorer == "clip" else "itm_scores"


def rule_threshold(settings: FilterSettings) -> float:
    return settings.threshold if settings.scorer == "clip" else settings.itm_threshold


def percentile_cutoff(scored, quantile: float, field: str = "scores") -> float | None:
    """The global quantile of web-caption scores, computed on the cluster (approxQuantile)."""
    from pyspark.sql import functions as F
    web = scored.filter(F.col(f"{PASS}.error").isNull()).select(F.col(f"{PASS}.{field}")[0].alias("s")).dropna()
    values = web.approxQuantile("s", [quantile], 1e-4)
    return values[0] if values else None


def select(scored, settings: FilterSettings, cutoff: float | None = None):
    """Candidates (web first, then synthetic) with scores and `kept`, best_score, caption_primary."""
    from pyspark.sql import functions as F

    present = scored.schema[PASS].dataType.fieldNames()  # a pass made before the ITM existed has no itm_scores
    clip = F.col(f"{PASS}.scores")
    itm = F.col(f"{PASS}.itm_scores") if "itm_scores" in present else F.lit(None).cast("array<float>")
    scores = clip if settings.scorer == "clip" else itm

    def candidate(text, source, i):
        return F.struct(text.alias("text"), F.lit(source).alias("source"), scores[i].alias("score"),
                        clip[i].alias("clip_score"), itm[i].alias("itm_score"))
    web = F.when(F.col("caption").isNotNull() & (F.trim(F.col("caption")) != ""),
                 F.array(candidate(F.col("caption"), "web", 0))).otherwise(F.array())
    synthetic = F.transform(F.col("synthetic_captions"), lambda t, i: candidate(t, "synthetic", i + 1))
    # A column of its own: the rules' lambdas read it many times per row, and an inlined concat would be
    # rebuilt at each read (topk on 9,705 rows: 5 s of interpreted lambdas per write).
    scored = scored.withColumn("_candidates", F.concat(web, synthetic))
    candidates = F.col("_candidates")
    if settings.rule == "topk":
        # Rank among the row's candidates (ties: earlier first); keep the top k above the floor.
        def kept(c, i):
            better = F.size(F.filter(F.sequence(F.lit(0), F.size(candidates) - 1), lambda j: (
                candidates[j]["score"] > c["score"]) | ((candidates[j]["score"] == c["score"]) & (j < i))))
            return (better < settings.top_k) & (c["score"] >= rule_threshold(settings))
    else:
        floor = rule_threshold(settings) if settings.rule == "threshold" else cutoff
        if floor is None:
            raise ValueError("the percentile rule needs the cutoff from percentile_cutoff()")

        def kept(c, i):
            return c["score"] >= F.lit(float(floor))
    marked = F.transform(candidates, lambda c, i: F.struct(
        c["text"].alias("text"), c["source"].alias("source"), c["score"].cast("float").alias("score"),
        F.coalesce(kept(c, i), F.lit(False)).alias("kept"), c["clip_score"].cast("float").alias("clip_score"),
        c["itm_score"].cast("float").alias("itm_score")))
    kept_sorted = F.array_sort(F.filter(F.col("candidates"), lambda c: c["kept"]),
                               lambda a, b: F.when(a["score"] > b["score"], -1).when(a["score"] < b["score"], 1)
                               .otherwise(0))
    return (scored.withColumn("candidates", marked).drop("_candidates")
            .withColumn("best_score", F.array_max(F.transform("candidates", lambda c: c["score"])).cast("float"))
            .withColumn("caption_primary", F.get(kept_sorted, 0)["text"]))  # null: no kept caption


def scoring_costs(marked) -> dict:
    """Each scoring step's cost as the model pass measured it: pairs scored and model seconds."""
    from pyspark.sql import functions as F

    def pairs(field):
        return F.sum(F.size(F.filter(F.coalesce(F.col(f"{PASS}.{field}"), F.array()), lambda v: v.isNotNull())))
    if "seconds" not in marked.schema[PASS].dataType.fieldNames():
        return {}
    row = marked.agg(pairs("scores").alias("clip_pairs"), pairs("itm_scores").alias("itm_pairs"),
                     F.sum(f"{PASS}.seconds.clip").alias("clip_seconds"),
                     F.sum(f"{PASS}.seconds.itm").alias("itm_seconds"),
                     F.count(f"{PASS}.embedding").alias("images")).first()
    costs = {}
    for step in ("clip", "itm"):
        n, seconds, images = row[f"{step}_pairs"] or 0, row[f"{step}_seconds"], row["images"]
        if seconds is not None:
            costs[step] = {"pairs": n, "seconds": round(seconds, 3),
                           "ms_per_pair": round(1000 * seconds / n, 4) if n else None,
                           "ms_per_image": round(1000 * seconds / images, 3) if images else None}
    return costs


def split_scored(selected, scorer: str = "clip"):
    """(scored records, rejects): a row is kept when some candidate is."""
    from pyspark.sql import functions as F

    def number(column):
        return F.format_number(F.coalesce(column, F.lit(float("nan"))), 4)

    error = F.col(f"{PASS}.error")
    any_kept = F.exists("candidates", lambda c: c["kept"])
    scored = (selected.filter(error.isNull() & any_kept)
              .withColumn("image_embedding", F.col(f"{PASS}.embedding")).drop(PASS))
    reason = F.when(error.isNotNull(), F.substring_index(error, ":", 1)).otherwise(F.lit(NO_ALIGNED_CAPTION))
    why = [F.lit("best score "), number(F.col("best_score"))]
    if scorer != "clip":  # the ITM's verdict, and how far the CLIP got (two_step: under the floor, no ITM score)
        why += [F.lit(" (ITM), best CLIP score "),
                number(F.array_max(F.transform("candidates", lambda c: c["clip_score"])))]
    detail = F.when(error.isNotNull(), error).otherwise(F.concat(*why))
    rejects = reject_rows(selected.filter(error.isNotNull() | ~any_kept), STAGE, reason, detail)
    return scored, rejects


def split(marked, cfg, context=None) -> Result:
    """The stage's split: the selection rule over every row's stored scores (the percentile cutoff is
    global), then records and rejects."""
    settings = cfg.filter
    cutoff = (percentile_cutoff(marked, settings.percentile, rule_scores(settings))
              if settings.rule == "percentile" else None)
    # Computed once: the scoring costs, the records and the rejects all read it (the costs read from
    # `marked` evaluated the view and the model output a second time: 1-2 s a run, measured at 1,000 rows).
    selected = select(marked, settings, cutoff).localCheckpoint()
    report = {"percentile_cutoff": cutoff, "scoring": scoring_costs(selected)}
    return Result(*split_scored(selected, settings.scorer), report)


DEFINITION = Stage(
    name=STAGE, reads=CAPTIONED, reasons=REASONS, split=split, model=CLIP, keeps_scores=True,
    help="CLIP-score web and synthetic captions and keep the aligned ones",
    adds=(*(SCORED.field(n) for n in ("candidates", "best_score")), CURATED.field("caption_primary")),
    from_model={"image_embedding": "embedding"},  # stored once, with every row's scores
    models=lambda cfg: {"clip": cfg.filter.model, "rule": cfg.filter.rule, "scorer": cfg.filter.scorer,
                        **({"itm": cfg.filter.itm_model} if cfg.filter.scorer != "clip" else {})})
