"""The caption stage: downloaded -> + synthetic_captions (+ rejects), K synthetic captions per image.

`caption(df, settings, seed)` is a DataFrame -> DataFrame transform that adds the captioner's output
in a struct column; `split_captioned` turns it into (captioned, rejects). `DEFINITION` is the stage
for the runner (capfilt.pipelines.stage); `CAPTIONER` its model pass, which curate fuses with the filter's.
"""
from __future__ import annotations

import time

from capfilt.pipelines.config import CaptionSettings
from capfilt.pipelines.stage import PASS, ModelPass, Result, Stage, reject_rows
from capfilt.schemas import CAPTIONED, DOWNLOADED
from capfilt.udfs.images import IMAGE_TOO_LARGE, UNDECODABLE_IMAGE

STAGE = "caption"
REASONS = {
    UNDECODABLE_IMAGE: "the stored image bytes do not decode (empty, truncated, not an image)",
    IMAGE_TOO_LARGE: "the image is over the pixel limit",
}
# What the captions depend on: a change needs a new captioner pass.
KEYS = ("caption.model", "caption.device", "caption.num_captions", "caption.top_p", "caption.temperature",
        "caption.max_new_tokens", "caption.min_new_tokens", "caption.repetition_penalty", "seed")


def _fields():
    from pyspark.sql import types as T
    return [T.StructField("captions", T.ArrayType(T.StringType()), True),
            T.StructField("caption_seconds", T.DoubleType(), True)]  # "seconds" is the filter's, in a fused pass


class CaptionBatch:
    """The captioner's part of a model pass: picklable settings only; the model comes from the
    worker's cache (capfilt.udfs.models), loaded on first use."""

    def __init__(self, settings: CaptionSettings, seed: int):
        self.settings = settings
        self.seed = seed

    def __call__(self, frame, images) -> dict:
        from capfilt.udfs.caption import CaptionParams, caption_batch
        from capfilt.udfs.models import cached_captioner, worker_model

        s = self.settings
        if s.num_captions == 0:  # filter only: no captioner is loaded, images are still checked
            return {"captions": [None if image is None else [] for image in images],
                    "caption_seconds": [None] * len(images)}
        captioner = worker_model(s, cached_captioner)
        params = CaptionParams(num_captions=s.num_captions, top_p=s.top_p, temperature=s.temperature,
                               max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                               repetition_penalty=s.repetition_penalty, batch_size=s.batch_size, seed=self.seed)
        started = time.perf_counter()
        captions = caption_batch(captioner, images, frame["uid"].tolist(), params)
        share = (time.perf_counter() - started) / max(sum(image is not None for image in images), 1)
        return {"captions": captions, "caption_seconds": [None if image is None else share for image in images]}


CAPTIONER = ModelPass(
    role="captioner", reads=("uid",), fields=_fields, batch=lambda cfg: CaptionBatch(cfg.caption, cfg.seed),
    settings=lambda cfg: cfg.caption, keys=KEYS,
    reference=lambda cfg: cfg.caption.model if cfg.caption.num_captions else None,
    feeds={"captions": "synthetic_captions"})


def caption(df, settings: CaptionSettings, seed: int = 0):
    """df + the pass struct (error, captions)."""
    from types import SimpleNamespace

    from capfilt.pipelines.stage import infer
    cfg = SimpleNamespace(caption=settings, seed=seed)
    return infer(df, cfg, [CAPTIONER], df.sparkSession.sparkContext.accumulator(0))


def captioning_cost(marked) -> dict:
    """The captioner's cost as the model pass measured it: images, captions written, model seconds (a
    pass stored before the cost was recorded, or one without a captioner: {})."""
    from pyspark.sql import functions as F
    if "caption_seconds" not in marked.schema[PASS].dataType.fieldNames():
        return {}
    timed = F.col(f"{PASS}.caption_seconds").isNotNull()
    row = marked.agg(F.sum(timed.cast("long")).alias("images"), F.sum(f"{PASS}.caption_seconds").alias("seconds"),
                     F.sum(F.when(timed, F.size(f"{PASS}.captions"))).alias("captions")).first()
    if not row["images"]:
        return {}
    return {"images": row["images"], "captions": row["captions"], "seconds": round(row["seconds"], 3),
            "ms_per_image": round(1000 * row["seconds"] / row["images"], 2)}


def split_captioned(marked):
    """(captioned records, rejects) from the output of `caption`."""
    from pyspark.sql import functions as F
    error = F.col(f"{PASS}.error")
    captioned = marked.filter(error.isNull()).withColumn("synthetic_captions", F.col(f"{PASS}.captions")).drop(PASS)
    rejects = reject_rows(marked.filter(error.isNotNull()), STAGE, F.substring_index(error, ":", 1), error)
    return captioned, rejects


DEFINITION = Stage(
    name=STAGE, reads=DOWNLOADED, adds=(CAPTIONED.field("synthetic_captions"),), reasons=REASONS,
    split=lambda marked, cfg, context: Result(*split_captioned(marked), {"captioning": captioning_cost(marked)}),
    model=CAPTIONER, depends=("seed",),
    help="write K synthetic captions per image (nucleus sampling)",
    fuse_next=lambda cfg: cfg.caption.fuse_filter,
    models=lambda cfg: {"captioner": cfg.caption.model if cfg.caption.num_captions else None})
