"""The caption stage: downloaded -> captioned (+ rejects), K synthetic captions per image.

`caption(df, settings, seed)` is a DataFrame -> DataFrame transform that adds the captioner's output
in a struct column; `split_captioned` turns it into (captioned, rejects). Persist the first before
splitting, or the captioner runs twice.
"""
from __future__ import annotations

from pipelines.config import CaptionSettings
from pipelines.inference import OUT, apply_batches

STAGE = "caption"
REASONS = {
    "undecodable_image": "the stored image bytes do not decode (empty, truncated, not an image)",
    "image_too_large": "the image is over the pixel limit",
}


def _out_type():
    from pyspark.sql import types as T
    return T.StructType([T.StructField("captions", T.ArrayType(T.StringType()), True),
                         T.StructField("error", T.StringType(), True)])


class CaptionBatch:
    """The batch function shipped to workers: picklable settings only; the model comes from the
    worker's cache (udfs.models), loaded on first use."""

    def __init__(self, settings: CaptionSettings, seed: int):
        self.settings = settings
        self.seed = seed

    def __call__(self, frame):
        import pandas as pd

        from pipelines.inference import worker_model
        from udfs.caption import CaptionParams, caption_batch
        from udfs.images import decode_images
        from udfs.models import cached_captioner

        s = self.settings
        images, errors = decode_images(frame["image"].tolist())
        if s.num_captions == 0:  # filter only: no captioner is loaded, images are still checked
            return pd.DataFrame({"captions": [[] if e is None else None for e in errors], "error": errors})
        captioner = worker_model(s, cached_captioner)
        params = CaptionParams(num_captions=s.num_captions, top_p=s.top_p, temperature=s.temperature,
                               max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                               repetition_penalty=s.repetition_penalty, batch_size=s.batch_size, seed=self.seed)
        captions = caption_batch(captioner, images, frame["uid"].tolist(), params)
        return pd.DataFrame({"captions": captions, "error": errors})


def caption(df, settings: CaptionSettings, seed: int = 0):
    return apply_batches(df, CaptionBatch(settings, seed), ["image", "uid"], _out_type(),
                         settings.gpus_per_task)


def split_captioned(marked):
    """(captioned records, rejects) from the output of `caption`."""
    from pyspark.sql import functions as F
    error = F.col(f"{OUT}.error")
    captioned = marked.filter(error.isNull()).withColumn("synthetic_captions", F.col(f"{OUT}.captions")).drop(OUT)
    rejects = marked.filter(error.isNotNull()).select(
        "uid", "url", "caption", F.lit(STAGE).alias("stage"),
        F.substring_index(error, ":", 1).alias("reason"), error.alias("detail"),
        F.lit(None).cast("string").alias("duplicate_of"))
    return captioned, rejects
