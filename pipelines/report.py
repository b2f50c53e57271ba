"""What `capfilt inspect` shows of a curated output: computed with Spark aggregations, plus a bounded,
deterministic sample for the gallery (the only rows that reach the driver).

    funnel      rows after each stage, and rejected rows per stage and reason (from the manifests,
                cross-checked against OUT/rejects and the curated files' footers)
    scores      quantiles and kept fraction of candidate caption scores, per source (web, synthetic,
                inherited_*), and a histogram of each
    stages      each stage of the run, in the manifest's order: seconds, rows in and out, rows/s, MB of
                Parquet written, rows run through each model, and whether it was reused from an earlier run
    shards      each OUT/curated file: rows (from the Parquet footer) and bytes
    sections    {key: figures} of what each stage adds (Stage.inspect): the download's failure map
                (download_failures, pipelines/download_report.py)
    gallery     up to `kept` curated rows and up to `per_reason` rejected rows of each reason, picked by
                a hash of the uid, with thumbnails (from OUT/stages/download for dropped rows) and
                candidates (OUT/stages/filter; unscored from OUT/stages/caption for filter rejects)
"""
from __future__ import annotations

import base64
import io

import fsspec

from capfilt.pipelines.output import check_current, read_manifest
from capfilt.pipelines.io import count_rejects
from capfilt.pipelines.publish import stage_dir
from capfilt.pipelines import registry

SOURCES = ("web", "synthetic", "inherited_web", "inherited_synthetic")  # the order reports list them in
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
THUMBNAIL = 96
BINS = 40
MISSING = "\u2013"  # a figure the manifest does not hold (one written before it was recorded)
STAGE_COLUMNS = ("stage", "seconds", "rows in", "rows out", "rows/s", "MB written", "model passes")
TOP_HOSTS = 20  # rows of a stage section's longest tables (the failure map's hosts), most first


class ReportMismatch(ValueError):
    """OUT/rejects does not hold what the manifest says: the output was changed after the run."""


def read_parquet(spark, path: str):
    return spark.read.option("pathGlobFilter", "*.parquet").parquet(path)


def _stage_data(spark, root: str, stage: str, columns: tuple[str, ...]):
    """uid + columns of a stage's data, one row per uid; None when the stage output is not there."""
    path = f"{stage_dir(root, stage)}/data"
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local) or not any(f.endswith(".parquet") for f in fs.find(local)):  # data/capfilt_part=<i>/
        return None
    return read_parquet(spark, path).select("uid", *columns).dropDuplicates(["uid"])


def _holders(columns: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """{stage: the given columns it is the first in the chain to write}: the first stage writes whole
    records (the image among them), a later one the columns it declares (Stage.adds)."""
    holders: dict[str, tuple[str, ...]] = {}
    for column in columns:
        stage = next((s.name for s in registry.stages() if s.adds is None and column == "image"
                      or any(f.name == column for f in s.adds or ())), None)
        if stage is not None:  # no stage writes it: the gallery shows the rows without it
            holders[stage] = (*holders.get(stage, ()), column)
    return holders


def _rejected_by_stage(counts: dict) -> dict[str, int]:
    return {stage: sum(reasons.values()) for stage, reasons in counts.get("rejected", {}).items()}


def funnel(spark, root: str, manifest: dict) -> dict:
    """Rows after each stage and rejected rows per stage and reason, from the manifest; every number
    is checked against OUT/rejects and the stage manifests, and a disagreement raises ReportMismatch."""
    counts = manifest["counts"]
    rejected_total = sum(sum(r.values()) for r in counts["rejected"].values())
    problems = []
    if counts["input"] != counts["output"] + rejected_total:
        problems.append(f"input {counts['input']} != curated {counts['output']} + rejected {rejected_total}")
    if counts.get("rejected_total", rejected_total) != rejected_total:
        problems.append(f"rejected_total {counts['rejected_total']} != the sum per reason {rejected_total}")
    found = count_rejects(spark, f"{root}/rejects")
    if found != counts["rejected"]:
        problems.append(f"{root}/rejects holds {found}, the manifest says {counts['rejected']}")
    stages = manifest["stages"]
    previous = ("input", counts["input"])
    for stage in registry.funnel():
        if stage not in stages:
            continue
        sc = stages[stage]["counts"]
        dropped = sum(_rejected_by_stage(sc).values())
        if sc["input"] != previous[1]:
            problems.append(f"stage {stage} read {sc['input']} rows, {previous[0]} has {previous[1]}")
        if sc["input"] != sc["output"] + dropped or dropped != sum(counts["rejected"].get(stage, {}).values()):
            problems.append(f"stage {stage}: {sc['input']} in, {sc['output']} out, {dropped} rejected, "
                            f"the curated manifest says {sum(counts['rejected'].get(stage, {}).values())} rejected")
        previous = (stage, sc["output"])
    if stages and previous[1] != counts["output"]:
        problems.append(f"the last stage ({previous[0]}) wrote {previous[1]} rows, the manifest says {counts['output']} curated")
    if problems:
        raise ReportMismatch(f"{root} does not add up (changed after the run?): " + "; ".join(problems))
    after = [("input", counts["input"])] + [(s, stages[s]["counts"]["output"]) for s in registry.funnel() if s in stages]
    return {"after": after, "curated": counts["output"], "rejected": counts["rejected"],
            "kept_fraction": counts["output"] / counts["input"] if counts["input"] else 0.0}


def _number(value):
    """A figure of the manifest, or None for a missing or non-numeric one (a hand-edited manifest)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_figures(manifest: dict) -> list[dict]:
    """What each stage of the run took and made, in the manifest's order (new stages included); None
    where the manifest lacks a figure. Rows in and out fall back to the stage's counts, and rows/s to
    rows in / seconds: the same figures, as manifests written before these keys recorded them. The
    write step is last, also where the manifest keeps it beside `stages` (a top-level `write`)."""
    stages = dict(manifest.get("stages") or {})
    if "write" not in stages and isinstance(manifest.get("write"), dict):
        stages["write"] = manifest["write"]
    figures = []
    for name, stage in stages.items():
        stage = stage if isinstance(stage, dict) else {}
        counts = stage.get("counts") if isinstance(stage.get("counts"), dict) else {}
        seconds = _number(stage.get("seconds"))
        rows_in = _number(stage.get("rows_in", counts.get("input")))
        rate = _number(stage.get("rows_per_s"))
        if rate is None and "rows_per_s" not in stage and rows_in is not None and seconds:
            rate = rows_in / seconds
        passes = stage.get("model_passes")
        figures.append({
            "stage": str(name), "reused": stage.get("reused") is True, "seconds": seconds, "rows_in": rows_in,
            "rows_out": _number(stage.get("rows_out", counts.get("output"))), "rows_per_s": rate,
            "bytes_written": _number(stage.get("bytes_written")),
            "model_passes": {str(k): _number(v) for k, v in passes.items()} if isinstance(passes, dict) else None})
    return figures


def stage_cells(figure: dict) -> tuple[str, ...]:
    """One stage's figures as the text and HTML reports show them, in STAGE_COLUMNS order (MB: 2**20 bytes,
    as output.target_file_mb counts them)."""
    def number(value, spec):
        return MISSING if value is None else format(value, spec)
    passes = figure["model_passes"]
    if passes is None:
        shown = MISSING
    else:
        shown = " \u00b7 ".join(f"{role} {number(n, ',')}" for role, n in passes.items()) or "none"
    bytes_written = figure["bytes_written"]
    return (figure["stage"] + (" (reused)" if figure["reused"] else ""), number(figure["seconds"], ",.1f"),
            number(figure["rows_in"], ","), number(figure["rows_out"], ","), number(figure["rows_per_s"], ",.1f"),
            MISSING if bytes_written is None else f"{bytes_written / 2**20:,.2f}", shown)


def plain(text) -> str:
    """Text from the data, safe for a terminal: control characters (escape sequences) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def print_counts(counts: dict, where: str) -> None:
    """A stage output's rows in, out and rejected per stage and reason (a download's summary)."""
    print(f"\n{plain(where)}: {counts['input']} rows in, {counts['output']} out, {counts['rejected_total']} rejected")
    for stage, reasons in sorted(counts["rejected"].items()):
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {plain(stage):<10} {plain(reason):<22} {n:>8}")


def stage_table(figures: list[dict]) -> list[str]:
    """The stage table as lines for a terminal: aligned columns, control characters in names escaped."""
    rows = [STAGE_COLUMNS] + [tuple(plain(c) for c in stage_cells(f)) for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(STAGE_COLUMNS) - 1)]
    return ["  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])] + [r[-1]])
            for r in rows]


def scores(spark, root: str) -> dict:
    """Per candidate source: rows, kept fraction, quantiles (exact) and a histogram over [lo, hi]."""
    from pyspark.sql import functions as F
    cands = (read_parquet(spark, f"{root}/curated").select(F.explode("candidates").alias("c"))
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
    order = {source: i for i, source in enumerate(SOURCES)}
    return {"sources": dict(sorted(stats.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))), "bins": bins}


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
    """A data: URI of a small JPEG (at most THUMBNAIL px a side, aspect kept), or None when the bytes
    do not decode."""
    from PIL import Image

    from capfilt.udfs.images import thumbnail_image
    image = thumbnail_image(data, THUMBNAIL, Image.Resampling.BICUBIC, keep_ratio=True)  # PIL's thumbnail default
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _candidates(row) -> list[dict]:
    """The scored candidates; for a row dropped before scoring finished (no_aligned_caption has no
    scored record), its web caption and synthetic captions, unscored."""
    row = row.asDict()
    if row.get("candidates"):
        return [c.asDict() for c in row["candidates"]]
    texts = [("web", row["caption"])] * bool(row["caption"]) + [("synthetic", t) for t in row.get("synthetic_captions") or []]
    return [{"text": t, "source": source, "score": None, "kept": False} for source, t in texts]


def gallery(spark, root: str, kept: int = 24, per_reason: int = 8) -> list[dict]:
    """At most `kept` curated rows and `per_reason` rejected rows per reason, picked by a hash of the
    uid (the same OUT gives the same sample); only these rows reach the driver."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    pick = F.xxhash64("uid")
    items = []
    curated = read_parquet(spark, f"{root}/curated")
    for r in curated.orderBy(pick, "uid").limit(kept).select(
            "uid", "url", "caption", "image", "caption_primary", "candidates", "best_score").collect():
        items.append({"kept": True, "uid": r["uid"], "url": r["url"], "caption": r["caption"],
                      "stage": None, "reason": "kept", "detail": None, "duplicate_of": None,
                      "primary": r["caption_primary"], "best_score": r["best_score"],
                      "candidates": [c.asDict() for c in r["candidates"]], "thumbnail": thumbnail(r["image"])})
    rank = F.row_number().over(Window.partitionBy("stage", "reason").orderBy(pick, "uid"))
    dropped = read_parquet(spark, f"{root}/rejects").withColumn("rank", rank).filter(F.col("rank") <= per_reason).drop("rank")
    # Rows dropped by the first stage have no image of their own (a duplicate_uid row shares its uid with
    # a kept one); a later stage's row gets each column from the first stage of the chain that writes it.
    source = registry.names()[0]
    later = dropped.filter(F.col("stage") != source)
    for stage, columns in _holders(("image", "synthetic_captions", "candidates", "best_score")).items():
        data = _stage_data(spark, root, stage, columns)
        later = later.join(data, "uid", "left") if data is not None else later
    rows = (later.unionByName(dropped.filter(F.col("stage") == source), allowMissingColumns=True)
            .orderBy("stage", "reason", pick, "uid"))
    for r in rows.collect():  # at most per_reason rows per reason
        items.append({"kept": False, "uid": r["uid"], "url": r["url"], "caption": r["caption"],
                      "stage": r["stage"], "reason": r["reason"], "detail": r["detail"],
                      "duplicate_of": r["duplicate_of"], "primary": None, "best_score": r.asDict().get("best_score"),
                      "candidates": _candidates(r), "thumbnail": thumbnail(r.asDict().get("image"))})
    return items


def clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def aligned(rows: list[tuple], right: set[int]) -> list[str]:
    """Rows of cells as terminal lines: columns two spaces apart, those in `right` right-aligned."""
    rows = [tuple(plain(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def sections(spark, root: str, top: int = TOP_HOSTS, stages=None) -> dict:
    """{key: figures} of the sections the stages add to the report (Stage.inspect: the download's failure
    map), each computed from root (a curate OUT, or the stage's own output); `stages`: those of the run
    (default: every stage of the chain)."""
    return {section.key: section.compute(spark, root, top)
            for stage in stages or registry.stages() for section in stage.inspect}


def build(spark, out_root: str, kept: int = 24, per_reason: int = 8, top_hosts: int = TOP_HOSTS) -> dict:
    root = str(out_root).rstrip("/")
    manifest = read_manifest(root)
    if manifest.get("stage") != "curate":
        raise ValueError(f"{root} is a {manifest.get('stage')!r} stage output, not a `capfilt curate` output")
    check_current(root, manifest)  # a stage committed after the curated rows: the numbers would mix two runs
    files = shards(root)
    if sum(f["rows"] for f in files) != manifest["counts"]["output"]:
        raise ReportMismatch(f"{root}/curated holds {sum(f['rows'] for f in files)} rows (Parquet footers), "
                             f"the manifest says {manifest['counts']['output']}: the output was changed after the run")
    return {"root": root, "finished_at": manifest.get("finished_at"),
            "seconds": manifest.get("seconds"), "models": manifest.get("models", {}),
            "reasons": manifest.get("reasons") or {}, "funnel": funnel(spark, root, manifest),
            "stages": stage_figures(manifest),
            "scores": scores(spark, root), "shards": files,
            "sections": sections(spark, root, top_hosts,
                                 [s for s in registry.stages() if s.name in manifest.get("stages", {})]),
            "gallery": gallery(spark, root, kept, per_reason)}
