"""What `capfilt inspect` shows of a curated output: computed with Spark aggregations, plus a bounded,
deterministic sample for the gallery (the only rows that reach the driver).

    funnel      rows after each stage, and rejected rows per stage and reason (from the manifest,
                cross-checked against OUT/rejects)
    scores      quantiles and kept fraction of candidate caption scores, per source (web, synthetic,
                inherited_*), and a histogram of each
    shards      each OUT/curated file: rows (from the Parquet footer) and bytes
    gallery     up to `kept` curated rows and up to `per_reason` rejected rows of each reason, picked by
                a hash of the uid, with thumbnails (from OUT/stages/download for dropped rows)
"""
from __future__ import annotations

import base64
import io

import fsspec

from pipelines.output import read_manifest
from pipelines.publish import STAGES, stage_dir

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
THUMBNAIL = 96
BINS = 40


class ReportMismatch(RuntimeError):
    """OUT/rejects does not hold what the manifest says: the output was changed after the run."""


def _parquet(spark, path: str):
    return spark.read.option("pathGlobFilter", "*.parquet").parquet(path)


def funnel(spark, root: str, manifest: dict) -> dict:
    counts = manifest["counts"]
    stages = manifest.get("stages", {})
    after = [("input", counts["input"])] + [(s, stages[s]["counts"]["output"]) for s in STAGES if s in stages]
    found: dict[str, dict[str, int]] = {}
    for row in _parquet(spark, f"{root}/rejects").groupBy("stage", "reason").count().collect():
        found.setdefault(row["stage"], {})[row["reason"]] = row["count"]
    if found != counts["rejected"]:
        raise ReportMismatch(f"{root}/rejects holds {found}, the manifest says {counts['rejected']}: "
                             f"the output was changed after the run")
    return {"after": after, "curated": counts["output"], "rejected": counts["rejected"],
            "kept_fraction": counts["output"] / counts["input"] if counts["input"] else 0.0}


def scores(spark, root: str) -> dict:
    """Per candidate source: rows, kept fraction, quantiles (exact) and a histogram over [lo, hi]."""
    from pyspark.sql import functions as F
    cands = (_parquet(spark, f"{root}/curated").select(F.explode("candidates").alias("c"))
             .select(F.col("c.source").alias("source"), F.col("c.score").alias("score"),
                     F.col("c.kept").cast("int").alias("kept")).filter(F.col("score").isNotNull())).cache()
    stats = {}
    rows = cands.groupBy("source").agg(
        F.count("*").alias("n"), F.avg("kept").alias("kept"), F.min("score").alias("lo"),
        F.max("score").alias("hi"), F.percentile("score", list(QUANTILES)).alias("q")).collect()
    if not rows:
        cands.unpersist()
        return {"sources": {}, "bins": []}
    lo, hi = min(r["lo"] for r in rows), max(r["hi"] for r in rows)
    width = (hi - lo) / BINS or 1.0
    bins = [lo + width * i for i in range(BINS + 1)]
    for r in rows:
        stats[r["source"]] = {"n": r["n"], "kept_fraction": r["kept"], "quantiles": dict(zip(QUANTILES, r["q"])),
                              "histogram": [0] * BINS}
    bucket = F.least(F.floor((F.col("score") - F.lit(lo)) / F.lit(width)), F.lit(BINS - 1)).cast("int")
    for r in cands.groupBy("source", bucket.alias("b")).count().collect():
        stats[r["source"]]["histogram"][r["b"]] = r["count"]
    cands.unpersist()
    return {"sources": dict(sorted(stats.items())), "bins": bins}


def shards(root: str) -> list[dict]:
    import pyarrow.parquet as pq
    fs, path = fsspec.core.url_to_fs(f"{root}/curated")
    out = []
    for info in sorted(fs.ls(path, detail=True), key=lambda i: i["name"]):
        if info["name"].endswith(".parquet"):
            with fs.open(info["name"], "rb") as f:
                out.append({"file": info["name"].rsplit("/", 1)[-1], "rows": pq.ParquetFile(f).metadata.num_rows,
                            "bytes": info["size"]})
    return out


def thumbnail(data: bytes | None) -> str | None:
    """A data: URI of a small JPEG, or None when the bytes do not decode."""
    from udfs.images import decode_image
    image, _ = decode_image(data)
    if image is None:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery(spark, root: str, kept: int = 24, per_reason: int = 8) -> list[dict]:
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    pick = F.xxhash64("uid")
    items = []
    curated = _parquet(spark, f"{root}/curated")
    for r in curated.orderBy(pick, "uid").limit(kept).select(
            "uid", "url", "caption", "image", "caption_primary", "candidates", "best_score").collect():
        items.append({"kept": True, "uid": r["uid"], "url": r["url"], "caption": r["caption"],
                      "stage": None, "reason": "kept", "detail": None, "duplicate_of": None,
                      "primary": r["caption_primary"], "best_score": r["best_score"],
                      "candidates": [c.asDict() for c in r["candidates"]], "thumbnail": thumbnail(r["image"])})
    rank = F.row_number().over(Window.partitionBy("stage", "reason").orderBy(pick, "uid"))
    dropped = _parquet(spark, f"{root}/rejects").withColumn("rank", rank).filter(F.col("rank") <= per_reason).drop("rank")
    images = _parquet(spark, f"{stage_dir(root, 'download')}/data").select("uid", "image").dropDuplicates(["uid"])
    scored = _parquet(spark, f"{stage_dir(root, 'filter')}/data").select("uid", "candidates", "best_score") \
        .dropDuplicates(["uid"])
    # Rows dropped at download have no image of their own (a duplicate_uid row shares its uid with a kept one).
    later = dropped.filter(F.col("stage") != "download")
    rows = (later.join(images, "uid", "left").join(scored, "uid", "left")
            .unionByName(dropped.filter(F.col("stage") == "download"), allowMissingColumns=True)
            .orderBy("stage", "reason", pick, "uid"))
    for r in rows.collect():  # at most per_reason rows per reason
        items.append({"kept": False, "uid": r["uid"], "url": r["url"], "caption": r["caption"],
                      "stage": r["stage"], "reason": r["reason"], "detail": r["detail"],
                      "duplicate_of": r["duplicate_of"], "primary": None, "best_score": r["best_score"],
                      "candidates": [c.asDict() for c in (r["candidates"] or [])],
                      "thumbnail": thumbnail(r["image"])})
    return items


def build(spark, out_root: str, kept: int = 24, per_reason: int = 8) -> dict:
    root = str(out_root).rstrip("/")
    manifest = read_manifest(root)
    if manifest.get("stage") != "curate":
        raise ValueError(f"{root} is a {manifest.get('stage')!r} stage output, not a `capfilt curate` output")
    return {"root": root, "finished_at": manifest.get("finished_at"), "seconds": manifest.get("seconds"),
            "models": manifest.get("models", {}), "reasons": manifest.get("reasons", {}),
            "funnel": funnel(spark, root, manifest), "scores": scores(spark, root), "shards": shards(root),
            "gallery": gallery(spark, root, kept, per_reason)}
