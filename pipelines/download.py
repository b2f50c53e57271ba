"""The download stage: pairs -> downloaded records + rejects, with img2dataset on Spark.

    precheck   (DataFrame -> DataFrame) rows that must not be fetched: malformed_row, duplicate_uid, invalid_url,
               empty_caption
    fetch      img2dataset's Reader, Resizer and Downloader, run by its pyspark distributor inside our
               SparkSession; our wrappers (capfilt.net.fetch) add the address policy, opt-out and bomb checks
    classify   (DataFrame -> DataFrame) img2dataset's status row per input row -> a record or a named reject

Every input row ends in exactly one of: the downloaded records, or the rejects with one of REASONS.
"""
from __future__ import annotations

import math
import time

from capfilt.net.fetch import OPTED_OUT_MARK, TOO_LARGE_MARK
from capfilt.net.netguard import BLOCKED_MARK
from capfilt.net.polite import RETRYABLE_CODES
from capfilt.pipelines.config import DownloadSettings
from capfilt.pipelines.inputs import MALFORMED
from capfilt.pipelines.stage import reject_rows

STAGE = "download"
MALFORMED_ROW, DUPLICATE_UID, INVALID_URL, EMPTY_CAPTION = "malformed_row", "duplicate_uid", "invalid_url", "empty_caption"
BLOCKED_ADDRESS, OPTED_OUT = BLOCKED_MARK, OPTED_OUT_MARK  # raised with these words by capfilt.net.netguard / capfilt.net.fetch
FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, TOO_SMALL, TOO_LARGE = "failed_to_download", "failed_to_decode", "too_small", "too_large"
REASONS = {
    MALFORMED_ROW: "the reader could not parse the row: a broken JSON line, a CSV row with more or fewer "
                     "fields than the header, or CSV lines folded by an unterminated quote (detail shows the text)",
    DUPLICATE_UID: "another row has the same uid (the first by url, caption is kept)",
    INVALID_URL: "not an http(s) URL with a host",
    EMPTY_CAPTION: "caption is null or blank (download.drop_empty_captions)",
    BLOCKED_ADDRESS: "the URL, a redirect or its DNS name leads to a private, loopback, link-local, "
                       "multicast or metadata address that is not allow-listed",
    OPTED_OUT: "the publisher opted out: X-Robots-Tag (noai, noimageai, noindex, noimageindex), robots.txt "
               "disallows the URL, or tdm-reservation: 1 (the detail's code says which)",
    FAILED_TO_DOWNLOAD: "HTTP error, timeout, reset, refused, redirect loop, the host's robots.txt unreachable... "
                        "(detail says which)",
    FAILED_TO_DECODE: "the body is not a decodable image (truncated, not an image, empty)",
    TOO_SMALL: "shorter side below download.min_image_size",
    TOO_LARGE: "over download.max_image_pixels, max_aspect_ratio or max_bytes",
}
CODE_PATTERN = r"^([a-z][a-z0-9_]*): "  # a download reject's detail: "<code>: <what happened>"
# How retryable failures were recognised before details had codes (outputs of older versions).
_LEGACY_RETRYABLE = (r"HTTP Error (5\d\d|429|408)|timed out|[Rr]eset|[Rr]efused|Remote end closed|"
                    r"shard failed|Temporary failure|IncompleteRead|EOF occurred")
# Scheme in any case; no whitespace, Unicode space or control character (NUL...) anywhere; \z, not $,
# which would let a trailing newline through.
_URL_OK = r"^(?i:https?)://[^\p{Z}\p{Cc}/?#@]*[A-Za-z0-9\]][^\p{Z}\p{Cc}/?#]*([/?#][^\p{Z}\p{Cc}]*)?\z"
# A caption is blank unless it has a character that is not a space, separator, control or format
# character (Spark's trim strips only spaces: tab, newline, NBSP and zero-width space are blank too).
_VISIBLE = r"[^\p{Z}\p{Cc}\p{Cf}]"


def precheck(pairs, settings: DownloadSettings):
    """Mark rows that must not be fetched, without touching the network: `_reason` is null for rows
    to fetch. Split with `to_fetch` and `prechecked_rejects` (persist it first: it has a window)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    malformed = F.col(MALFORMED).isNotNull() if MALFORMED in pairs.columns else F.lit(False)
    # Unparseable rows rank last, so they never make a parsed row a duplicate.
    first = Window.partitionBy("uid").orderBy(malformed.asc(), F.col("url").asc_nulls_last(),
                                              F.col("caption").asc_nulls_last())
    blank_caption = F.col("caption").isNull() | ~F.col("caption").rlike(_VISIBLE)
    reason = (F.when(malformed, F.lit(MALFORMED_ROW))
              .when(F.row_number().over(first) > 1, F.lit(DUPLICATE_UID))
              .when(F.col("url").isNull() | ~F.col("url").rlike(_URL_OK), F.lit(INVALID_URL)))
    if settings.drop_empty_captions:
        reason = reason.when(blank_caption, F.lit(EMPTY_CAPTION))
    return pairs.withColumn("_reason", reason)


def to_fetch(marked):
    return marked.filter(marked["_reason"].isNull()).drop("_reason", MALFORMED)


def prechecked_rejects(marked):
    from pyspark.sql import functions as F
    r = F.col("_reason")
    raw = F.col(MALFORMED) if MALFORMED in marked.columns else F.lit(None).cast("string")
    detail = (F.when(r == MALFORMED_ROW, raw)
              .when(r == DUPLICATE_UID, F.concat(F.lit("uid "), F.col("uid"), F.lit(" seen before")))
              .when(r == INVALID_URL, F.concat(F.lit("url: "), F.substring(F.coalesce("url", F.lit("<null>")), 1, 200)))
              .otherwise(F.lit("caption is empty")))
    return reject_rows(marked.filter(r.isNotNull()), STAGE, r, detail, F.when(r == DUPLICATE_UID, F.col("uid")))


def shard_size(rows: int, parallelism: int, settings: DownloadSettings) -> int:
    """Rows per img2dataset shard: the configured size, smaller when that would leave cores idle."""
    return max(1, min(settings.rows_per_shard, math.ceil(rows / max(1, parallelism))))


# scheme://[userinfo@]host[:port]: the authority robots.txt is kept for, and the host a budget is kept for.
_AUTHORITY = r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^\]/?#]*\]|[^:/?#]*)(?::([0-9]+))?"


def polite(settings: DownloadSettings) -> bool:
    return settings.max_requests_per_second_per_host > 0 or settings.max_connections_per_host > 0


def with_hosts(todo, settings: DownloadSettings):
    """todo + _host (lower-cased name, no port: what a worker keeps a budget for), _authority
    (scheme://host:port) and _limited (false for allow-listed endpoints unless polite_to_allowed_hosts)."""
    from pyspark.sql import functions as F

    from capfilt.net.polite import exempt_entries
    scheme = F.lower(F.regexp_extract("url", _AUTHORITY, 1))
    host = F.lower(F.regexp_extract("url", _AUTHORITY, 2))
    written = F.regexp_extract("url", _AUTHORITY, 3)
    port = F.when(written != "", written.cast("int")).when(scheme == "https", F.lit(443)).otherwise(F.lit(80))
    name = F.regexp_replace(host, r"^\[(.*)\]$", "$1")
    limited = F.lit(True)
    if not settings.polite_to_allowed_hosts:
        for h, p in exempt_entries(settings.allow_hosts):
            limited = limited & ~((name == h) & (F.lit(True) if p is None else port == p))
    return todo.withColumns({"_host": name, "_authority": F.concat(scheme, F.lit("://"), host, F.lit(":"),
                                                                  port.cast("string")),
                             "_limited": limited})


def robots_refusals(todo, settings: DownloadSettings, partitions: int):
    """(uid, url, caption, detail) of the rows robots.txt disallows: one request per host, in parallel.
    Materialise the result once (write it): each evaluation fetches again."""
    from pyspark.sql.types import StringType, StructField, StructType

    policy = fetch_policy(settings)
    tokens = policy.user_agent_tokens
    token, timeout, threads = settings.user_agent_token, settings.timeout, settings.threads

    def check(batches):
        import pandas as pd

        from capfilt.net.fetch import guarded
        from capfilt.net.robots import RobotsCache
        with guarded(policy):
            cache = RobotsCache(token, tokens, timeout, threads)
            for pdf in batches:
                pdf = pdf.assign(detail=cache.refusals(pdf["_authority"].tolist(), pdf["url"].tolist()))
                yield pd.DataFrame(pdf[pdf.detail.notna()][["uid", "url", "caption", "detail"]])

    schema = StructType([StructField(c, StringType()) for c in ("uid", "url", "caption", "detail")])
    rows = with_hosts(todo, settings).filter("_limited").select("uid", "url", "caption", "_authority")
    return rows.repartition(partitions, "_authority").mapInPandas(check, schema)


def robots_rejects(refused):
    """robots_refusals' rows as rejects: opted_out (code robots_txt), or failed_to_download when the
    host's robots.txt was unreachable (code robots_txt_unreachable: RFC 9309's complete disallow holds
    for the run, and --retry-failed asks again)."""
    from pyspark.sql import functions as F
    unreachable = F.col("detail").startswith("robots_txt_unreachable: ")
    return reject_rows(refused, STAGE, F.when(unreachable, F.lit(FAILED_TO_DOWNLOAD)).otherwise(F.lit(OPTED_OUT)),
                       F.col("detail"))


def plan_shards(todo, n_todo: int, settings: DownloadSettings, rows_per_shard: int, parallelism: int, plan_dir: str):
    """Write todo into shards (plan_dir/_shard=N) that keep each host's rows together, and return
    (number of shards, {host: share}) for the hosts several shards share.

    Hosts are laid end to end, largest first, and cut every rows_per_shard rows: a host smaller than a
    shard lands in one (or two, at a cut); a large one spreads over consecutive shards, so no host is
    one endless task. A host in k shards gets 1/min(k, parallelism) of its budget in each, and at most
    `parallelism` shards run at once, so the job stays within the budget. Inside a shard the rows take
    turns across hosts (its first row of each host, then its second...), so threads never queue on one host."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = with_hosts(todo, settings).drop("_authority", "_limited")
    hosts = rows.groupBy("_host").agg(F.count("*").alias("_count"))  # an input may have a "count" column
    before = Window.orderBy(F.desc("_count"), "_host").rowsBetween(Window.unboundedPreceding, -1)
    hosts = hosts.withColumn("_start", F.coalesce(F.sum("_count").over(before), F.lit(0)))
    rank = F.row_number().over(Window.partitionBy("_host").orderBy("uid")) - 1
    rows = rows.join(hosts, "_host").withColumn("_pos", F.col("_start") + rank)
    shard = F.floor(F.col("_pos") / rows_per_shard)
    first_in_shard = F.greatest(F.col("_start"), shard * rows_per_shard)
    planned = rows.withColumns({"_shard": shard.cast("int"), "_turn": F.col("_pos") - first_in_shard,
                                "_mix": F.xxhash64("_host")})
    n_shards = max(1, math.ceil(n_todo / rows_per_shard))
    (planned.drop("_count", "_start", "_pos", "_host").repartition(n_shards, "_shard")
     .sortWithinPartitions("_shard", "_turn", "_mix").write.mode("overwrite").partitionBy("_shard").parquet(plan_dir))
    spans = F.floor((F.col("_start") + F.col("_count") - 1) / rows_per_shard) - F.floor(F.col("_start") / rows_per_shard) + 1
    shared = hosts.withColumn("k", spans).filter("k > 1").select("_host", "k").collect()
    return n_shards, {r["_host"]: int(min(r["k"], max(1, parallelism))) for r in shared}


def fetch_policy(settings: DownloadSettings, shares: dict[str, int] | None = None):
    """What a download worker's opener enforces (net/fetch.py, net/polite.py); each call is a new run
    (its own per-host state in the workers)."""
    import uuid

    from capfilt.net.fetch import FetchPolicy
    from capfilt.net.polite import exempt_entries
    return FetchPolicy(
        allow_hosts=tuple(settings.allow_hosts), loopback_only=settings.loopback_only, max_bytes=settings.max_bytes,
        user_agent_tokens=tuple(dict.fromkeys([settings.user_agent_token.lower(), "img2dataset"])),
        opt_out_directives=tuple(settings.opt_out_directives), tdm_reservation=settings.tdm_reservation,
        requests_per_second=settings.max_requests_per_second_per_host,
        connections=settings.max_connections_per_host, host_shares=tuple(sorted((shares or {}).items())),
        retries=settings.retries, backoff_s=settings.retry_backoff_s, max_retry_after_s=settings.max_retry_after_s,
        max_retry_after_answers=settings.max_retry_after_answers,
        max_retry_after_total_s=settings.max_retry_after_total_s,
        exempt=() if settings.polite_to_allowed_hosts else exempt_entries(settings.allow_hosts),
        ca_bundle=settings.ca_bundle or None, retry_tls=settings.retry_tls, run=uuid.uuid4().hex)


def fetch(spark, input_dir: str, shards_dir: str, extra_columns: list[str], settings: DownloadSettings,
          rows_per_shard: int, progress: bool = True, plan: dict | None = None) -> None:
    """Run img2dataset over the prepared input (parquet with uid, url, caption, extras) into shards_dir,
    or over the shards of a plan ({"dir", "shards", "shares"}: plan_shards). Shards already finished
    there (their _stats.json exists) are skipped: this is what resumes."""
    import fsspec
    from img2dataset.distributor import pyspark_distributor
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.writer import ParquetSampleWriter

    from capfilt.net.fetch import GuardedDownloader, stored_form

    fs, shards_path = fsspec.core.url_to_fs(shards_dir)
    fs.makedirs(f"{shards_path}/_tmp", exist_ok=True)  # img2dataset's Reader writes its input shards here
    done = {int(p.rsplit("/", 1)[-1].split("_")[0]) for p in fs.glob(f"{shards_path}/*_stats.json")}
    if plan is None:
        shards = Reader(input_dir, "parquet", "url", "caption", None, None, ["uid", *extra_columns],
                        rows_per_shard, done, f"{shards_dir}/_tmp")
    else:  # GuardedDownloader turns each folder into the Arrow file img2dataset's Reader would write
        plan_fs, plan_path = fsspec.core.url_to_fs(plan["dir"])
        shards = [(i, f"{plan['dir']}/_shard={i}") for i in range(plan["shards"])
                  if i not in done and plan_fs.exists(f"{plan_path}/_shard={i}")]
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=stored_form(settings),
        thread_count=settings.threads, save_caption=True, extract_exif=settings.extract_exif,
        output_folder=shards_dir, column_list=["uid", *extra_columns, "caption", "url"], timeout=settings.timeout,
        number_sample_per_shard=rows_per_shard, oom_shard_count=5, compute_hash="sha256",
        verify_hash_type=None, encode_format=settings.encode_format,
        retries=0,  # the opener retries by code, with backoff (net/fetch.py: _PoliteOpener)
        user_agent_token=settings.user_agent_token,
        disallowed_header_directives=settings.opt_out_directives or None)
    policy = fetch_policy(settings, plan and plan["shares"])
    logger = Progress(shards_dir, plan["shards"] if plan else None) if progress else None
    try:
        pyspark_distributor(0, GuardedDownloader(downloader, policy, f"{shards_dir}/_tmp"), shards, settings.subjob_size,
                            settings.max_shard_retry)
    finally:
        if logger is not None:
            logger.stop()
        if fs.exists(f"{shards_path}/_tmp"):
            fs.rm(f"{shards_path}/_tmp", recursive=True)


class Progress:
    """A driver thread printing the download's progress from the shards' _stats.json every `every`
    seconds: img2dataset's LoggerProcess does the same from a process of its own, which imports torch
    (8-10 s of CPU taken from the download workers)."""

    def __init__(self, shards_dir: str, shards: int | None = None, every: float = 10.0):
        import threading
        self.shards_dir, self.shards, self.every = shards_dir, shards, every
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        import json

        import fsspec
        fs, path = fsspec.core.url_to_fs(self.shards_dir)
        stats = [json.loads(fs.cat(f)) for f in fs.glob(f"{path}/*_stats.json")]
        rows = sum(s["count"] for s in stats)
        ok = sum(s["successes"] for s in stats)
        seconds = time.monotonic() - self.started
        of = f" of {self.shards}" if self.shards else ""
        return (f"download: {len(stats)}{of} shards done, {rows:,} rows ({ok / rows:.1%} downloaded), "
                f"{rows / seconds:,.1f} rows/s over {seconds:,.0f} s" if rows else
                f"download: no shard finished yet ({seconds:,.0f} s)")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                print(self.line(), flush=True)
            except (OSError, ValueError, KeyError):
                pass  # a stats file being written: the next round reads it

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        print(self.line(), flush=True)


def classify(results, todo, settings: DownloadSettings, complete: bool = False):
    """img2dataset's status rows (and the todo rows they should cover) -> (downloaded, rejects).
    `complete`: the caller counted one status row per todo row, so the search for missing rows
    (a shuffle) is skipped."""
    from pyspark.sql import functions as F

    fmt = settings.encode_format
    err = F.coalesce(F.col("error_message"), F.lit(""))
    # "<urlopen error X>" -> "X", one line: details are read by people.
    detail = F.regexp_replace(F.regexp_replace(err, r"(?s)^<urlopen error (.*)>$", "$1"), r"\s*\n\s*", " ")
    reason = (F.when(F.col("status") == "success", F.lit(None))
              .when(err.contains(BLOCKED_MARK), F.lit(BLOCKED_ADDRESS))
              .when(err.contains(OPTED_OUT_MARK) | err.contains("X-Robots-Tag"), F.lit(OPTED_OUT))
              .when(err.contains(TOO_LARGE_MARK) | err.contains("image area too large")
                    | err.contains("aspect ratio too large"), F.lit(TOO_LARGE))
              .when(err.contains("image too small"), F.lit(TOO_SMALL))
              .when(F.col("status") == "failed_to_resize", F.lit(FAILED_TO_DECODE))
              .otherwise(F.lit(FAILED_TO_DOWNLOAD)))
    marked = results.withColumn("_reason", reason)
    # Every failure's detail starts with its code ("http_404: HTTP Error 404: Not Found"): the opener's
    # own, else one named after the resizer's reason.
    own = F.regexp_extract(detail, CODE_PATTERN, 1)
    r = F.col("_reason")
    code = (F.when(own != "", own).when(r == TOO_SMALL, F.lit("too_small")).when(r == TOO_LARGE, F.lit("too_large"))
            .when(r == FAILED_TO_DECODE, F.lit("decode")).otherwise(F.lit("other")))
    detail = F.when(own != "", detail).otherwise(F.concat(code, F.lit(": "), detail))
    # Extras by quoted name: an input name may hold dots, backticks, spaces.
    extras = [F.col("`" + c.replace("`", "``") + "`") for c in todo.columns if c not in ("uid", "url", "caption")]
    downloaded = marked.filter(F.col("_reason").isNull()).select(
        "uid", "url", "caption", F.col(fmt).alias("image"), "width", "height", "original_width",
        "original_height", "sha256", *extras, *([F.col("exif")] if settings.extract_exif and "exif" in results.columns else []))
    failed = reject_rows(marked.filter(F.col("_reason").isNotNull()), STAGE, F.col("_reason"),
                         F.substring(detail, 1, 500))
    if complete:
        return downloaded, failed
    # A shard that failed as a whole (after max_shard_retry) wrote no status rows: its rows are not lost.
    missing = reject_rows(todo.join(results.select("uid"), "uid", "left_anti"), STAGE, FAILED_TO_DOWNLOAD,
                          "shard_failed: no status row (retryable)")
    return downloaded, failed.unionByName(missing)


def failure_code(detail):
    """The code a download reject's detail starts with ('' for outputs written before codes)."""
    from pyspark.sql import functions as F
    return F.regexp_extract(detail, CODE_PATTERN, 1)


def retryable(rejects, tls: bool = False):
    """The rejects --retry-failed fetches again: selected by code (by text for outputs from before codes);
    tls failures too when asked (download.retry_tls)."""
    from pyspark.sql import functions as F
    code = failure_code(F.col("detail"))
    codes = sorted(RETRYABLE_CODES | ({"tls"} if tls else set()))
    return rejects.filter((F.col("reason") == FAILED_TO_DOWNLOAD) & (
        code.isin(*codes) | ((code == "") & F.col("detail").rlike(_LEGACY_RETRYABLE))))
