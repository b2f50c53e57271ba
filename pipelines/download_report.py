"""The download's part of `capfilt inspect`: its failure map (Stage.inspect of pipelines/download_stage.py).

Fetched rows (the downloaded records and the download rejects of OUT/rejects, the precheck's left out:
they were never fetched) by outcome, by the detail's code and HTTP status, and the hosts with the most
failures. Hosts, reasons and codes come from the data: every one is escaped in the text and the page.
"""
from __future__ import annotations

import re

import fsspec

from capfilt.pipelines.output import NotCommittedError, read_manifest
from capfilt.pipelines.publish import stage_dir
from capfilt.pipelines.report import TOP_HOSTS, aligned, clipped, read_parquet, plain
from capfilt.pipelines.report_html import table, e

TOP_CODES = 30  # codes in the failure map; the rest are summed in one line
NO_HOST, NO_CODE = "(no host)", "-"
HOST_WIDTH = 80  # a longer host is cut in the terminal (the HTML page wraps it)
# A download detail's machine-readable code, as in `http_404: HTTP Error 404: Not Found`. Details written
# before codes were recorded have none: their code is NO_CODE.
CODE = r"^([a-z][a-z0-9_]*): "
# scheme://authority: the authority is the host with its port, after any userinfo.
AUTHORITY = r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)"


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
        return read_parquet(spark, f"{stage}/data").select("url")
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
        read_parquet(spark, f"{root}/rejects").filter(F.col("stage") == STAGE).select("url", "reason", "detail"))
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
    stage = root if is_download_output(root) else stage_dir(root, "download")
    try:
        connections = read_manifest(stage).get("connections") or None
    except NotCommittedError:
        connections = None
    return {"connections": connections, "fetched": fetched, "downloaded": downloaded, "failed": fetched - downloaded,
            "not_fetched": sum(n for _, n in skipped), "outcomes": outcomes, "codes": codes,
            "other_codes": other_codes, "statuses": statuses, "hosts": hosts,
            "host_count": totals["hosts"], "failing_hosts": totals["failing"] or 0}


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
    lines += aligned([("outcome", "rows", "of fetched")] + [
        (o["outcome"], f"{o['rows']:,}", "not fetched" if o["share"] is None else f"{o['share']:.1%}")
        for o in failures["outcomes"]], {1, 2})
    if failures["codes"]:
        other = failures["other_codes"]
        lines += [""] + aligned([("code", "rows")] + [(c["code"], f"{c['rows']:,}") for c in failures["codes"]]
                                + ([(f"({other['codes']:,} other codes)", f"{other['rows']:,}")] if other else []), {1})
    if failures["statuses"]:
        lines += [""] + aligned([("HTTP status", "rows")] + [(str(s["status"]), f"{s['rows']:,}")
                                                             for s in failures["statuses"]], {0, 1})
    if failures["hosts"]:
        lines += [""] + aligned([("host", "fetched", "failed", "success", "top reason", "top code")] + [
            (clipped(plain(h["host"]), HOST_WIDTH), f"{h['fetched']:,}", f"{h['failed']:,}", f"{h['success_rate']:.1%}", h["reason"], h["code"])
            for h in failures["hosts"]], {1, 2, 3})
        lines.append(f"  ({len(failures['hosts'])} of {failures['failing_hosts']:,} hosts with failures shown, "
                     f"most failures first; {failures['host_count']:,} hosts fetched from)")
    return lines + connection_lines(failures.get("connections"))


def connection_lines(connections: dict | None) -> list[str]:
    """The fetch's connection reuse (the download manifest's `connections`), by host."""
    if not connections:
        return []
    lines = ["", f"connections: {connections['connections']:,} opened for {connections['requests']:,} requests "
                 f"({connections['requests_per_connection']} per connection), {connections['tls_handshakes']:,} "
                 f"TLS handshakes, {connections['hosts']:,} hosts"]
    top = connections.get("top_hosts") or {}
    lines += aligned([("host", "connections", "requests", "per connection", "TLS handshakes")] + [
        (clipped(plain(host), HOST_WIDTH), f"{f['connections']:,}", f"{f['requests']:,}",
         str(f["requests_per_connection"]), f"{f['tls_handshakes']:,}") for host, f in top.items()], {1, 2, 3, 4})
    return lines


def failure_html(failures: dict | None, root: str) -> str:
    """The download failure map (download_failures): outcomes, codes, HTTP statuses, worst hosts.
    Hosts, reasons and codes come from the data: every one is escaped."""
    if failures is None:
        return f"<p>Omitted: {e(stage_dir(root, 'download'))}/data is not there.</p>"
    parts = [f"<p>{e(failure_summary(failures))}.</p>", '<div class="side">', table(
        ("outcome", "rows", "of fetched"),
        [(o["outcome"], f"{o['rows']:,}", "not fetched" if o["share"] is None else f"{o['share']:.1%}")
         for o in failures["outcomes"]], {1, 2})]
    if failures["codes"]:
        other = failures["other_codes"]
        parts.append(table(("code", "rows"), [(c["code"], f"{c['rows']:,}") for c in failures["codes"]]
                           + ([(f"({other['codes']:,} other codes)", f"{other['rows']:,}")] if other else []), {1}))
    if failures["statuses"]:
        parts.append(table(("HTTP status", "rows"), [(s["status"], f"{s['rows']:,}") for s in failures["statuses"]],
                           {0, 1}))
    parts.append("</div>")
    if failures["hosts"]:
        rows = "".join(
            f"<tr><td>{e(h['host'])}</td><td class=n>{h['fetched']:,}</td><td class=n>{h['failed']:,}</td>"
            f"<td class=\"n{' bad' if h['success_rate'] < 0.5 else ''}\">{h['success_rate']:.1%}</td>"
            f"<td>{e(h['reason'])}</td><td>{e(h['code'])}</td></tr>" for h in failures["hosts"])
        parts.append("<table><tr><th>host</th><th>fetched</th><th>failed</th><th>success</th><th>top reason</th>"
                     f"<th>top code</th></tr>{rows}</table>"
                     f'<p class="legend">{len(failures["hosts"])} of {failures["failing_hosts"]:,} hosts with '
                     f'failures, most failures first; {failures["host_count"]:,} hosts fetched from. Fetched rows: '
                     "downloaded records and failed fetches; the precheck's rejects were never fetched. Codes "
                     "begin the detail (<code>dns</code>, <code>timeout</code>, <code>http_404</code>...); "
                     "<code>-</code>: a detail without one.</p>")
    lines = connection_lines(failures.get("connections"))
    if lines:  # the same aligned table as the terminal's
        parts.append(f"<pre>{e(chr(10).join(lines[1:]))}</pre>")
    return "".join(parts)
