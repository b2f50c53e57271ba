"""The heads stage: scored -> scored + head_scores (+ rejects). Small models over the stored embedding.

Each head in `heads.drop` or `heads.flag` (udfs/heads.py: a card and weights) scores every row from the
image embedding the filter stored: no image is decoded, no CLIP runs. Every row keeps every head's
score in `head_scores` (scores are data: a threshold can change later without rescoring); a drop head
also rejects the rows it flags, with the head's name as the reason and the score in the detail. A
head made for another CLIP is refused before any work.
"""
from __future__ import annotations

import pandas as pd  # module level: Spark reads the pandas UDFs' type hints from these globals

from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import SCORED, Field
from capfilt.schemas.contract import FLOAT32, STRING, list_of, struct_of

STAGE = "heads"
HEAD_SCORES = Field("head_scores", list_of(struct_of(Field("name", STRING, False), Field("score", FLOAT32, True))),
                    False, "each embedding head's score (heads.drop and heads.flag), in config order")


def load_heads(cfg) -> list[tuple[object, str]]:
    """[(Head, 'drop' | 'flag')] in config order, each with its heads.thresholds override; names must differ."""
    import dataclasses

    from capfilt.udfs.heads import HeadError, load_head
    heads, seen = [], {}
    for mode in ("drop", "flag"):
        for path in getattr(cfg.heads, mode):
            head = load_head(path)
            if head.name in seen:
                raise HeadError(f"heads {seen[head.name]} and {path} are both named {head.name!r}: names are "
                                f"reasons and score keys, they must differ")
            seen[head.name] = path
            heads.append((dataclasses.replace(head, threshold=float(cfg.heads.thresholds.get(head.name, head.threshold))),
                          mode))
    unknown = set(cfg.heads.thresholds) - set(seen)
    if unknown:
        raise HeadError(f"heads.thresholds names {', '.join(sorted(unknown))}, which is no head of this run "
                        f"({', '.join(seen) or 'none'})")
    return heads


def check(cfg, input_root: str | None = None) -> None:
    """On the driver, before Spark: every head loads, and each was made for the CLIP whose embeddings it
    will read (the input's filter stage's; in curate, this run's filter.model)."""
    from capfilt.udfs.heads import check_embedding_model
    clip = (clip_of_input(input_root) if input_root else None) or cfg.filter.model
    for head, _ in load_heads(cfg):
        check_embedding_model(head, clip)


def clip_of_input(input_root: str) -> str | None:
    """The CLIP of the filter stage in the chain of a committed stage output (None: no filter in it)."""
    from capfilt.pipelines.output import read_manifest
    from capfilt.pipelines.stage import Chain
    manifest = read_manifest(input_root)
    if "chain" not in manifest:  # the first stage's output: no stage stored embeddings yet
        return None
    return clip_of(Chain.of(input_root, manifest, 0))


def clip_of(chain) -> str | None:
    """The CLIP reference the stage of this chain that stored the image embeddings ran with (they are the
    heads' input): the stage whose kept model output gives the `image_embedding` column."""
    from capfilt.pipelines.output import read_manifest
    from capfilt.pipelines.registry import definition
    root = next((where for name, where in chain.roots[1:] if "image_embedding" in definition(name).from_model), None)
    return read_manifest(root).get("models", {}).get("clip") if root else None


def score_column(heads):
    """A pandas UDF: stored embedding bytes -> [score per head]."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def scores(embeddings: pd.Series) -> pd.Series:
        import numpy as np

        from capfilt.udfs.heads import embeddings_from_bytes
        x = embeddings_from_bytes(embeddings)
        if x.shape[1] == 0:
            return pd.Series([[None] * len(heads)] * len(x))
        table = np.stack([h.scores(x) for h in heads], axis=1)
        # NaN and infinity stay what they are: the driver refuses them (unscored), they never pass as null
        return pd.Series([[float(v) for v in row] for row in table])
    return F.pandas_udf(scores, T.ArrayType(T.FloatType()))


def refuse_unscored(marked, heads) -> None:
    """Every row must have a finite score from every head: a NaN, an infinity or a missing score (broken
    weights, a broken stored embedding) is an error naming the head, not a row that no head flags."""
    from pyspark.sql import functions as F

    from capfilt.udfs.heads import HeadError

    def unscored(i):
        s = F.col("_scores")[i]
        return s.isNull() | F.isnan(s) | (F.abs(s) == float("inf"))
    counts = marked.select(*[F.sum(unscored(i).cast("int")).alias(str(i)) for i in range(len(heads))]).first()
    for i, head in enumerate(heads):
        if counts and counts[str(i)]:
            example = marked.filter(unscored(i)).select("uid", F.col("_scores")[i].alias("s")).first()
            raise HeadError(f"head {head.name} gave no finite score to {counts[str(i)]} rows (uid {example['uid']}: "
                            f"{example['s']}): its weights or the stored image embeddings are broken; nothing was "
                            f"written")


def reasons(cfg) -> dict[str, str]:
    """One reason per head that drops rows: its name."""
    return {h.name: f"head {h.name} ({h.architecture}) scored {h.direction} its threshold (detail: the score)"
            for h, mode in load_heads(cfg) if mode == "drop"}


def split(rows, cfg, context) -> Result:
    from pyspark.sql import functions as F

    from capfilt.udfs.heads import HeadError, check_embedding_model
    heads = load_heads(cfg)
    clip = clip_of(context.chain) or cfg.filter.model
    for head, _ in heads:
        check_embedding_model(head, clip)
    first = rows.select(F.length("image_embedding").alias("n")).filter("n is not null").first()
    for head, _ in heads:
        if first and first["n"] // 2 != head.input_dim:
            raise HeadError(f"head {head.name} takes {head.input_dim}-d embeddings; the stored ones are "
                            f"{first['n'] // 2}-d")
    report = {"heads": {h.name: {"mode": mode, "architecture": h.architecture, "threshold": h.threshold,
                                 "direction": h.direction, "embedding_model": h.card["embedding_model"]}
                        for h, mode in heads}}
    scored = rows.withColumn("_scores", score_column([h for h, _ in heads])("image_embedding"))
    scored = scored.withColumn(HEAD_SCORES.name, F.array(*[
        F.struct(F.lit(h.name).alias("name"), F.col("_scores")[i].alias("score")) for i, (h, _) in enumerate(heads)]))
    reason, detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for i, (h, mode) in reversed(list(enumerate(heads))):  # the first drop head that flags a row names it
        if mode != "drop":
            continue
        s = F.col("_scores")[i]
        hit = (s > h.threshold) if h.direction == "above" else (s < h.threshold)
        reason = F.when(hit, F.lit(h.name)).otherwise(reason)
        detail = F.when(hit, F.concat(F.lit(f"{h.name} score "), F.format_number(s, 4),
                                      F.lit(f" {'>' if h.direction == 'above' else '<'} {h.threshold:g}"))).otherwise(detail)
    marked = scored.withColumn("_reason", reason).withColumn("_detail", detail).localCheckpoint()
    refuse_unscored(marked, [h for h, _ in heads])
    kept = marked.filter(F.col("_reason").isNull())
    return Result(kept, reject_rows(marked.filter(F.col("_reason").isNotNull()), STAGE, F.col("_reason"),
                                    F.col("_detail")), report)


DEFINITION = Stage(name=STAGE, reads=SCORED, adds=(HEAD_SCORES,), reasons=reasons, split=split, check=check,
                   help="score rows with small heads over the stored CLIP embedding; drop or flag",
                   enabled=lambda cfg: bool(cfg.heads.drop or cfg.heads.flag),
                   models=lambda cfg: {"heads": {"drop": list(cfg.heads.drop), "flag": list(cfg.heads.flag)}})
