"""What `capfilt inspect` shows of a curated output: computed with Spark aggregations, plus a bounded,
deterministic sample for the gallery (the only rows that reach the driver).

    funnel      rows after each stage, and rejected rows per stage and reason (from the manifests,
                cross-checked against OUT/rejects and the curated files' footers)
    scores      quantiles and kept fraction of candidate caption scores, per source (web, synthetic,
                inherited_*), and a histogram of each
    stages      each stage of the run, in the manifest's order: seconds, rows in and out, rows/s, MB of
                Parquet written, rows run through each model, and whether it was reused from an earlier run
    shards      each OUT/curated file: rows (from the Parquet footer) and bytes
    download_failures
                the download failure map: fetched rows (OUT/stages/download/data + the download rejects
                of OUT/rejects, precheck rejects left out) by outcome, by the detail's code, by HTTP
                status, and the hosts with the most failures; None when OUT/stages/download is gone
    gallery     up to `kept` curated rows and up to `per_reason` rejected rows of each reason, picked by
                a hash of the uid, with thumbnails (from OUT/stages/download for dropped rows) and
                candidates (OUT/stages/filter; unscored from OUT/stages/caption for filter rejects)
"""
from __future__ import annotations

import base64
import io
import re

import fsspec

from capfilt.pipelines.output import NotCommittedError, check_current, read_manifest
from capfilt.pipelines.io import count_rejects
from capfilt.pipelines.publish import stage_dir
from capfilt.pipelines import registry

SOURCES = ("web", "synthetic", "inherited_web", "inherited_synthetic")  # the order reports list them in
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
THUMBNAIL = 96
BINS = 40
MISSING = "\u2013"  # a figure the manifest does not hold (one written before it was recorded)
STAGE_COLUMNS = ("stage", "seconds", "rows in", "rows out", "rows/s", "MB written", "model passes")
TOP_HOSTS = 20  # hosts in the failure map, most failures first
TOP_CODES = 30  # codes in the failure map; the rest are summed in one line
NO_HOST, NO_CODE = "(no host)", "-"
HOST_WIDTH = 80  # a longer host is cut in the terminal (the HTML page wraps it)
# A download detail's machine-readable code, as in `http_404: HTTP Error 404: Not Found`. Details written
# before codes were recorded have none: their code is NO_CODE.
CODE = r"^([a-z][a-z0-9_]*): "
# scheme://authority: the authority is the host with its port, after any userinfo.
AUTHORITY = r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)"


class ReportMismatch(ValueError):
    """OUT/rejects does not hold what the manifest says: the output was changed after the run."""


def _parquet(spark, path: str):
    return spark.read.option("pathGlobFilter", "*.parquet").parquet(path)


def _stage_data(spark, root: str, stage: str, columns: tuple[str, ...]):
    """uid + columns of a stage's data, one row per uid; None when the stage output is not there."""
    path = f"{stage_dir(root, stage)}/data"
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local) or not any(f.endswith(".parquet") for f in fs.find(local)):  # data/capfilt_part=<i>/
        return None
    return _parquet(spark, path).select("uid", *columns).dropDuplicates(["uid"])


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


def _plain(text) -> str:
    """Text from the data, safe for a terminal: control characters (escape sequences) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def stage_table(figures: list[dict]) -> list[str]:
    """The stage table as lines for a terminal: aligned columns, control characters in names escaped."""
    rows = [STAGE_COLUMNS] + [tuple(_plain(c) for c in stage_cells(f)) for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(STAGE_COLUMNS) - 1)]
    return ["  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])] + [r[-1]])
            for r in rows]


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
    curated = _parquet(spark, f"{root}/curated")
    for r in curated.orderBy(pick, "uid").limit(kept).select(
            "uid", "url", "caption", "image", "caption_primary", "candidates", "best_score").collect():
        items.append({"kept": True, "uid": r["uid"], "url": r["url"], "caption": r["caption"],
                      "stage": None, "reason": "kept", "detail": None, "duplicate_of": None,
                      "primary": r["caption_primary"], "best_score": r["best_score"],
                      "candidates": [c.asDict() for c in r["candidates"]], "thumbnail": thumbnail(r["image"])})
    rank = F.row_number().over(Window.partitionBy("stage", "reason").orderBy(pick, "uid"))
    dropped = _parquet(spark, f"{root}/rejects").withColumn("rank", rank).filter(F.col("rank") <= per_reason).drop("rank")
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


def host_of(url):
    """A URL column -> its host, lower-cased, without userinfo, with its port when it has one
    (F.parse_url's HOST drops the port); NO_HOST for null or a URL without scheme://host."""
    from pyspark.sql import functions as F
    host = F.lower(F.regexp_replace(F.regexp_extract(url, AUTHORITY, 1), r"^.*@", ""))
    return F.when(host.isNull() | (host == ""), F.lit(NO_HOST)).otherwise(host)


def code_of(detail):
    """A detail column -> its code (`http_404`, `dns`, `timeout`...), NO_CODE for an older detail without one."""
    from pyspark.sql import functions as F
    code = F.regexp_extract(detail, CODE, 1)
    return F.when(code.isNull() | (code == ""), F.lit(NO_CODE)).otherwise(code)


def is_download_output(root: str) -> bool:
    """Whether root is a committed `capfilt download` output (not a curate output)."""
    try:
        return read_manifest(root).get("stage") == "download"
    except NotCommittedError:
        return False


def _downloaded_urls(spark, root: str):
    """The url of each downloaded record (OUT/stages/download/data, or OUT/data when OUT is a `capfilt
    download` output); None when that output is gone. A download that fetched nothing has no data file:
    its manifest says 0 rows out."""
    stage = root if is_download_output(root) else stage_dir(root, "download")
    fs, local = fsspec.core.url_to_fs(f"{stage}/data")
    if fs.exists(local) and any(f.endswith(".parquet") for f in fs.find(local)):
        return _parquet(spark, f"{stage}/data").select("url")
    try:
        written = read_manifest(stage).get("counts", {}).get("output")
    except NotCommittedError:
        return None
    return spark.createDataFrame([], "url string") if written == 0 else None


def download_failures(spark, root: str, top_hosts: int = TOP_HOSTS) -> dict | None:
    """The download failure map, or None when OUT/stages/download is gone. Fetched rows are the
    downloaded records and the download rejects other than the precheck's (rows never fetched):

        outcomes      downloaded and each reject reason: rows, share of fetched rows (None: not fetched)
        codes         failed fetches per detail code, most first (TOP_CODES; other_codes sums the rest)
        statuses      failed fetches per HTTP status, from the http_NNN codes
        hosts         the top_hosts hosts with the most failed fetches: fetched, failed, success rate,
                      their most common reason and code

    One pass over the rows groups them by (host, reason, code); every table is an aggregate of that,
    and only the tables (bounded) reach the driver."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from capfilt.pipelines.download import DUPLICATE_UID, EMPTY_CAPTION, INVALID_URL, MALFORMED_ROW, STAGE
    urls = _downloaded_urls(spark, root)
    if urls is None:
        return None
    precheck = (MALFORMED_ROW, DUPLICATE_UID, INVALID_URL, EMPTY_CAPTION)
    none = F.lit(None).cast("string")
    rows = urls.select("url", none.alias("reason"), none.alias("detail")).unionByName(
        _parquet(spark, f"{root}/rejects").filter(F.col("stage") == STAGE).select("url", "reason", "detail"))
    was_fetched = F.col("reason").isNull() | ~F.col("reason").isin(*precheck)
    cells = (rows.select(F.when(was_fetched, host_of(F.col("url"))).alias("host"), "reason",  # reason null: downloaded
                         F.when(was_fetched, code_of(F.col("detail"))).alias("code"))
             .groupBy("host", "reason", "code").agg(F.count("*").alias("rows")).cache())
    try:
        by_reason = {r["reason"]: r["rows"] for r in cells.groupBy("reason").agg(F.sum("rows").alias("rows")).collect()}
        downloaded = by_reason.pop(None, 0)
        failed_by = sorted(((r, n) for r, n in by_reason.items() if r not in precheck), key=lambda kv: (-kv[1], kv[0]))
        skipped = sorted(((r, n) for r, n in by_reason.items() if r in precheck), key=lambda kv: (-kv[1], kv[0]))
        fetched = downloaded + sum(n for _, n in failed_by)
        outcomes = [{"outcome": name, "rows": n, "share": n / fetched if fetched else 0.0}
                    for name, n in [("downloaded", downloaded), *failed_by]]
        outcomes += [{"outcome": name, "rows": n, "share": None} for name, n in skipped]

        failed = cells.filter(F.col("reason").isNotNull() & ~F.col("reason").isin(*precheck))
        code_rows = failed.groupBy("code").agg(F.sum("rows").alias("rows"))
        codes = [{"code": r["code"], "rows": r["rows"]}
                 for r in code_rows.orderBy(F.desc("rows"), "code").limit(TOP_CODES).collect()]
        other_codes = None
        if len(codes) == TOP_CODES and (n_codes := code_rows.count()) > TOP_CODES:
            other_codes = {"codes": n_codes - TOP_CODES,
                           "rows": sum(n for _, n in failed_by) - sum(c["rows"] for c in codes)}
        if other_codes is None:  # every code is in hand
            found = [(int(c["code"][5:]), c["rows"]) for c in codes if re.fullmatch(r"http_[0-9]{3}", c["code"])]
        else:  # at most 1000 statuses
            status = F.regexp_extract("code", r"^http_([0-9]{3})$", 1)
            found = [(int(r["status"]), r["rows"]) for r in failed.filter(status != "")
                     .groupBy(status.alias("status")).agg(F.sum("rows").alias("rows")).collect()]
        statuses = [{"status": code, "rows": n} for code, n in sorted(found)]

        per_host = cells.filter(F.col("host").isNotNull()).groupBy("host").agg(
            F.sum("rows").alias("fetched"),
            F.sum(F.when(F.col("reason").isNotNull(), F.col("rows")).otherwise(0)).alias("failed"))
        totals = per_host.agg(F.count("*").alias("hosts"), F.sum((F.col("failed") > 0).cast("int")).alias("failing")).first()
        top = (per_host.filter(F.col("failed") > 0).orderBy(F.desc("failed"), "host").limit(top_hosts).collect()
               if top_hosts > 0 else [])
        names = [r["host"] for r in top]

        # Per top host, its reason and its code with the most failed rows (the first by name on a tie).
        most = {}
        if names:
            ours = failed.filter(F.col("host").isin(names))
            by_reason, by_code = (ours.groupBy("host", F.lit(kind).alias("kind"), F.col(kind).alias("value"))
                                  .agg(F.sum("rows").alias("rows")) for kind in ("reason", "code"))
            counts = by_reason.unionByName(by_code)
            rank = F.row_number().over(Window.partitionBy("host", "kind").orderBy(F.desc("rows"), "value"))
            most = {(r["host"], r["kind"]): r["value"] for r in counts.withColumn("rank", rank).filter(F.col("rank") == 1).collect()}
        hosts = [{"host": r["host"], "fetched": r["fetched"], "failed": r["failed"],
                  "success_rate": (r["fetched"] - r["failed"]) / r["fetched"],
                  "reason": most.get((r["host"], "reason")), "code": most.get((r["host"], "code"))} for r in top]
    finally:
        cells.unpersist()
    return {"fetched": fetched, "downloaded": downloaded, "failed": fetched - downloaded,
            "not_fetched": sum(n for _, n in skipped), "outcomes": outcomes, "codes": codes,
            "other_codes": other_codes, "statuses": statuses, "hosts": hosts,
            "host_count": totals["hosts"], "failing_hosts": totals["failing"] or 0}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _aligned(rows: list[tuple], right: set[int]) -> list[str]:
    """Rows of cells as terminal lines: columns two spaces apart, those in `right` right-aligned."""
    rows = [tuple(_plain(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def failure_summary(failures: dict) -> str:
    """The map's first line: how many fetched rows failed, and how many were never fetched."""
    share = failures["failed"] / failures["fetched"] if failures["fetched"] else 0.0
    return (f"{failures['failed']:,} of {failures['fetched']:,} fetched rows failed ({share:.1%}); "
            f"{failures['not_fetched']:,} rows never fetched (precheck)")


def failure_map(failures: dict | None, root: str = "OUT") -> list[str]:
    """The download failure map as lines for a terminal (data escaped as in stage_table)."""
    if failures is None:
        return [f"download failures: omitted, {stage_dir(root, 'download')}/data is not there"]
    lines = ["download failures: " + failure_summary(failures)]
    lines += _aligned([("outcome", "rows", "of fetched")] + [
        (o["outcome"], f"{o['rows']:,}", "not fetched" if o["share"] is None else f"{o['share']:.1%}")
        for o in failures["outcomes"]], {1, 2})
    if failures["codes"]:
        other = failures["other_codes"]
        lines += [""] + _aligned([("code", "rows")] + [(c["code"], f"{c['rows']:,}") for c in failures["codes"]]
                                 + ([(f"({other['codes']:,} other codes)", f"{other['rows']:,}")] if other else []), {1})
    if failures["statuses"]:
        lines += [""] + _aligned([("HTTP status", "rows")] + [(str(s["status"]), f"{s['rows']:,}")
                                                              for s in failures["statuses"]], {0, 1})
    if failures["hosts"]:
        lines += [""] + _aligned([("host", "fetched", "failed", "success", "top reason", "top code")] + [
            (_clip(_plain(h["host"]), HOST_WIDTH), f"{h['fetched']:,}", f"{h['failed']:,}", f"{h['success_rate']:.1%}", h["reason"], h["code"])
            for h in failures["hosts"]], {1, 2, 3})
        lines.append(f"  ({len(failures['hosts'])} of {failures['failing_hosts']:,} hosts with failures shown, "
                     f"most failures first; {failures['host_count']:,} hosts fetched from)")
    return lines


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
            "download_failures": download_failures(spark, root, top_hosts),
            "gallery": gallery(spark, root, kept, per_reason)}
