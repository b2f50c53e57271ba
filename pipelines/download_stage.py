"""The download stage as a Stage: its lifecycle, run by the runner (pipelines/stage.py: run_stage).

It reads the input metadata (not a committed stage), so it brings its own run: `decide` (provenance.py)
says what to do with a committed download, and this file does it:

    RUN       read the pairs, precheck, the prefilter (its filter step), robots.txt, plan, fetch into
              img2dataset shards, classify, write. Resumable as every stage is (StageOutput.resume: the
              fingerprint of the input and settings): `prepared.json` and the finished shards survive a kill.
    RESELECT  only prefilter settings changed: re-filter the committed download from its kept input.
              Rows the prefilter drops now move to the rejects; rows it allowed only now are fetched;
              nothing already fetched is fetched again.
    REUSE     nothing to do; with --retry-failed: fetch the retryable failures again and merge them.

The mechanics (precheck, robots.txt, shard plan, fetch, classify) are pipelines/download.py's.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

from capfilt.pipelines.download import REASONS, STAGE
from capfilt.pipelines.download_report import download_failures, failure_html, failure_map
from capfilt.pipelines.prefilter import DEFINITION as PREFILTER
from capfilt.pipelines.provenance import FETCH_ONLY, REFUSE, RESELECT, REUSE, input_source
from capfilt.pipelines.report import print_counts
from capfilt.pipelines.stage import Context, Section, Stage, refused

STATS_READ = 10_000


def preflight(root: str, decision, options: dict) -> None:
    """What the committed download at root cannot do, refused before Spark (curate asks in its plan)."""
    from capfilt.pipelines.output import StageOutput, read_manifest
    if options.get("retry_failed"):  # it reads the input the committed download kept: only its settings count
        if not StageOutput(root, STAGE).complete:
            raise ValueError(f"--retry-failed needs a committed download at {root}; run without it first")
        if decision.changed:
            raise ValueError(f"--retry-failed on {root}: it was downloaded with {decision.why}; a retry may "
                             f"change only how rows are fetched ({', '.join(sorted(FETCH_ONLY))}). Rerun without "
                             f"--retry-failed to apply the new settings, or with --overwrite to download everything again")
    elif decision.action == RESELECT and read_manifest(root).get("input_holds") != "prechecked":
        raise ValueError(f"{root} was downloaded by an older capfilt, whose kept input lacks the rows its "
                         f"prefilter dropped: it cannot be re-filtered under other prefilter settings ("
                         f"{', '.join(decision.changed)}); rerun with --overwrite")


def run(stage: Stage, cfg, spec, out, decision, options: dict) -> dict:
    from capfilt.pipelines.output import OutputLock, read_manifest
    from capfilt.pipelines.session import spark_session
    retry, progress = options.get("retry_failed", False), options.get("progress", True)
    if not retry and decision.action == REFUSE:
        raise refused(out.root, decision)
    if not retry and decision.action == REUSE:
        print(f"{out.root} is already committed: nothing to do (--overwrite to redo)")
        return read_manifest(out.root)
    with OutputLock(out.root):
        spark = spark_session(cfg.spark)
        print(f"Spark UI: {spark.sparkContext.uiWebUrl}", flush=True)
        if retry:
            manifest = _merge(spark, out, cfg, progress, retry=True)
        elif decision.action == RESELECT:
            manifest = _merge(spark, out, cfg, progress, retry=False)
        else:
            manifest = _download(spark, spec, out, cfg, progress)
    print_counts(manifest["counts"], out.root)
    return manifest


def _fingerprint(spec, cfg) -> str:
    """What a killed run's work depends on: the input (files included), the download and prefilter settings."""
    return hashlib.sha256(json.dumps([input_source(spec), cfg.download.__dict__, cfg.prefilter.__dict__],
                                     sort_keys=True, default=str).encode()).hexdigest()


def _prefilter(spark, out, pairs, cfg) -> tuple:
    """The filter step on the pairs, before any request: (its rejects written to out/prefilter, or None;
    its report)."""
    if not PREFILTER.enabled(cfg):
        return None, None
    result = PREFILTER.split(pairs, cfg, Context(None, 0, out.path("work")))
    result.rejects.write.mode("overwrite").parquet(out.path("prefilter"))
    return spark.read.parquet(out.path("prefilter")), result.report


def _download(spark, spec, out, cfg, progress: bool) -> dict:
    import fsspec

    from capfilt.pipelines.download import precheck, prechecked_rejects, to_fetch
    from capfilt.pipelines.inputs import read_pairs
    from capfilt.pipelines.io import parquet_rows

    timer = Timer()
    out.begin(resume=True, force=True)
    fs = fsspec.core.url_to_fs(out.path(""))[0]
    prepared_file = out.path("prepared.json").split("://")[-1]
    continued = out.resume(_fingerprint(spec, cfg))
    prepared = json.loads(fs.cat(prepared_file)) if continued and fs.exists(prepared_file) else None
    if prepared:
        print(f"Resuming: {prepared['todo']} rows to fetch, finished shards are skipped.")
    else:
        try:
            pairs = read_pairs(spark, spec)
        except Exception:
            out.abort()  # nothing was done yet: leave no hidden folder behind
            raise
        # One pass with the uid shuffle; everything after reads this small metadata-only file.
        precheck(pairs, cfg.download).write.mode("overwrite").parquet(out.path("prechecked"))
        n_input = parquet_rows(out.path("prechecked"))
        # OUT/input (kept: --retry-failed and a re-filter read it) holds every row that passed the
        # precheck, before the prefilter: a re-filter under other settings finds its rows there.
        files = max(1, math.ceil(n_input / (cfg.download.rows_per_shard * 10)))
        to_fetch(spark.read.parquet(out.path("prechecked"))).coalesce(files).write.mode("overwrite") \
            .parquet(out.path("input"))
        timer.lap("precheck")
        dropped, report = _prefilter(spark, out, spark.read.parquet(out.path("input")), cfg)
        timer.lap(PREFILTER.name)
        todo = "input"  # what may be fetched: the kept input less what the prefilter drops
        if dropped is not None:
            todo = "todo"
            spark.read.parquet(out.path("input")).join(dropped.select("uid"), "uid", "left_anti").coalesce(files) \
                .write.mode("overwrite").parquet(out.path(todo))
        prepared = {"input_rows": n_input, "prefilter": report,
                    **_prepare_fetch(spark, out, todo, cfg)}
        fs.pipe(prepared_file, json.dumps(prepared).encode())
    timer.lap("prepare")
    downloaded, failed = _fetch(spark, out, prepared, cfg, progress)
    timer.lap("fetch")
    rejects = prechecked_rejects(spark.read.parquet(out.path("prechecked"))).unionByName(failed)
    if prepared.get("prefilter"):
        rejects = rejects.unionByName(spark.read.parquet(out.path("prefilter")))
    return _commit(out, cfg, downloaded, rejects, prepared["input_rows"], input=spec.__dict__,
                   source=input_source(spec), shards=shard_stats(out.path("shards")) if prepared["todo"] else {},
                   connections=connection_stats(out.path("shards")) if prepared["todo"] else {},
                   timings=timer, prefilter=prepared.get("prefilter"))


def _merge(spark, out, cfg, progress: bool, retry: bool) -> dict:
    """A new version of the committed download, fetching only some rows and merging them: the retryable
    failures (retry), or the rows the prefilter allows only now (a re-filter: the prefilter runs again
    on the kept input, and the rows it drops now leave the records for the rejects). Nothing already
    fetched is fetched again."""
    from pyspark.sql import functions as F

    from capfilt.pipelines.download import retryable
    from capfilt.pipelines.io import parquet_rows, read_rejects
    from capfilt.pipelines.output import read_manifest

    committed = read_manifest(out.root)
    timer = Timer()
    data = spark.read.parquet(f"{out.root}/data")
    rejects = read_rejects(spark, out.root)
    kept_input = spark.read.parquet(f"{out.root}/input")
    out.begin(resume=False, force=True)
    kept_input.write.mode("overwrite").parquet(out.path("input"))
    report = committed.get("prefilter")
    if retry:
        again = retryable(rejects, tls=cfg.download.retry_tls).select("uid")
        rejects = rejects.join(again, "uid", "left_anti")
        todo = kept_input.join(again, "uid", "left_semi")
        moved = 0
    else:
        dropped, report = _prefilter(spark, out, spark.read.parquet(out.path("input")), cfg)
        drop = dropped.select("uid") if dropped is not None else spark.createDataFrame([], "uid string")
        was = rejects.filter(F.col("stage") == PREFILTER.name)
        rejects = rejects.filter(F.col("stage") != PREFILTER.name).join(drop, "uid", "left_anti")
        moved = data.join(drop, "uid", "left_semi").count()
        data = data.join(drop, "uid", "left_anti")
        todo = (spark.read.parquet(out.path("input")).join(drop, "uid", "left_anti")
                .join(was.select("uid"), "uid", "left_semi"))
        if dropped is not None:
            rejects = rejects.unionByName(dropped)
    timer.lap(PREFILTER.name)
    todo.write.mode("overwrite").parquet(out.path("todo"))
    n_todo = parquet_rows(out.path("todo"))
    print(f"Retrying {n_todo} rows that failed with a retryable reason." if retry else
          f"Re-filtering with the new prefilter settings: {moved} downloaded rows leave, {n_todo} rows it "
          f"allowed only now are fetched; nothing fetched before is fetched again.", flush=True)
    prepared = _prepare_fetch(spark, out, "todo", cfg)
    new_data, failed = _fetch(spark, out, prepared, cfg, progress)
    timer.lap("fetch")
    # An output whose first run fetched nothing may lack the input's extra columns (empty: nothing to lose).
    data = data.unionByName(new_data, allowMissingColumns=True)
    rejects = rejects.unionByName(failed)
    key = "retries" if retry else "refilters"
    history = {k: committed[k] for k in ("retries", "refilters") if k in committed}
    history[key] = [*committed.get(key, []), {"retried": n_todo} if retry else {"fetched": n_todo, "dropped": moved}]
    return _commit(out, cfg, data, rejects, committed["counts"]["input"], input=committed.get("input"),
                   source=committed.get("source"), shards=committed.get("shards", {}), timings=timer,
                   prefilter=report, before=committed["counts"]["output"] if retry else None,
                   # a retry keeps the input as it was: one kept by an older capfilt still lacks prefiltered rows
                   input_holds=committed.get("input_holds", "prefiltered"), **history)


def _commit(out, cfg, data, rejects, n_input: int, timings, prefilter, before: int | None = None,
            input_holds: str = "prechecked", **extra) -> dict:
    from capfilt.pipelines.output import build_manifest
    from capfilt.pipelines.stage import write_output
    counts, _ = write_output(out, DEFINITION, data, rejects, n_input, cfg.output.compression)
    timings.lap("write")
    if before is not None:
        extra["retries"][-1]["recovered"] = counts.output - before
    filters = {PREFILTER.name: {"reasons": PREFILTER.reasons_for(cfg), "report": prefilter}} if prefilter else {}
    manifest = build_manifest(out, cfg.to_dict(), counts, reasons=REASONS, timings=timings.laps,
                              input_holds=input_holds, filters=filters,
                              **({"prefilter": prefilter} if prefilter else {}), **extra)
    for work in ("shards", "prechecked", "robots", "todo", "fetch_input", "prefilter", "plan", "prepared.json",
                 "fingerprint", "work"):
        out.remove(work)
    out.commit(manifest)
    return manifest


def _prepare_fetch(spark, out, todo_name: str, cfg) -> dict:
    """robots.txt's refusals and the shard plan for the rows in out/<todo_name>: what the fetch reads."""
    from capfilt.pipelines.download import robots_refusals, shard_size
    from capfilt.pipelines.io import parquet_rows
    settings = cfg.download
    parallelism = settings.processes or spark.sparkContext.defaultParallelism
    n_todo = parquet_rows(out.path(todo_name))
    limited = bool(n_todo) and has_limited_hosts(spark.read.parquet(out.path(todo_name)), settings)
    fetch_input, refused = todo_name, 0
    if limited and settings.robots_txt:
        robots_refusals(spark.read.parquet(out.path(todo_name)), settings, parallelism) \
            .write.mode("overwrite").parquet(out.path("robots"))
        fetch_input = "fetch_input"
        files = max(1, math.ceil(n_todo / (settings.rows_per_shard * 10)))
        spark.read.parquet(out.path(todo_name)).join(spark.read.parquet(out.path("robots")).select("uid"), "uid",
                                                     "left_anti").coalesce(files) \
            .write.mode("overwrite").parquet(out.path(fetch_input))
        n_fetch = parquet_rows(out.path(fetch_input))
        refused = n_todo - n_fetch
        n_todo = n_fetch
    rows = shard_size(n_todo, parallelism, settings)
    return {"todo": n_todo, "refused": refused, "rows_per_shard": rows, "robots": fetch_input != todo_name,
            "fetch_input": fetch_input,
            "plan": planned(spark, out, fetch_input, n_todo, rows, parallelism, settings, limited)}


def _fetch(spark, out, prepared: dict, cfg, progress: bool):
    """(records, rejects) of the prepared rows: fetched into img2dataset shards (finished shards of a
    killed run are skipped), classified, robots.txt's refusals added."""
    from capfilt.pipelines.download import fetch, robots_rejects
    todo = spark.read.parquet(out.path(prepared["fetch_input"]))
    extras = [c for c in todo.columns if c not in ("uid", "url", "caption")]
    results = None
    if prepared["todo"]:
        fetch(spark, out.path(prepared["fetch_input"]), out.path("shards"), extras, cfg.download,
              prepared["rows_per_shard"], progress=progress, plan=prepared["plan"])
        results = spark.read.option("pathGlobFilter", "*.parquet").parquet(out.path("shards"))
    downloaded, failed = _classified(spark, results, todo, cfg, prepared["todo"], out.path("shards"))
    if prepared["robots"]:
        failed = failed.unionByName(robots_rejects(spark.read.parquet(out.path("robots"))))
    return downloaded, failed


def has_limited_hosts(todo, settings) -> bool:
    """Whether politeness applies to any row (allow-listed endpoints are exempt unless asked)."""
    from capfilt.pipelines.download import polite, with_hosts
    if not (polite(settings) or settings.robots_txt):
        return False
    if settings.polite_to_allowed_hosts or not settings.allow_hosts:
        return True
    return bool(with_hosts(todo, settings).filter("_limited").limit(1).count())


def planned(spark, out, input_name: str, n_todo: int, rows: int, parallelism: int, settings, limited: bool):
    """Shards that keep each host's rows together (pipelines/download.py: plan_shards) when per-host
    limits apply; None: img2dataset's Reader cuts the input as it comes."""
    from capfilt.pipelines.download import plan_shards, polite
    if not (limited and polite(settings) and n_todo):
        return None
    n_shards, shares = plan_shards(spark.read.parquet(out.path(input_name)), n_todo, settings, rows, parallelism,
                                   out.path("plan"))
    return {"dir": out.path("plan"), "shards": n_shards, "shares": shares}


def _classified(spark, results, todo, cfg, n_todo: int, shards_dir: str):
    from capfilt.pipelines.download import classify
    from capfilt.pipelines.io import empty_rejects
    if results is None:  # nothing was fetched: no rows, the columns a fetch would have given (extras too)
        from pyspark.sql import functions as F

        from capfilt.schemas import DOWNLOADED
        empty = spark.createDataFrame([], DOWNLOADED.spark_schema())
        extras = [F.lit(None).cast(f.dataType).alias(f.name) for f in todo.schema if f.name not in empty.columns]
        return empty.select("*", *extras), empty_rejects(spark)
    # One status row per fetched row: the shards' own counts say whether every todo row has one (past
    # STATS_READ shards, the anti-join in classify finds out instead).
    stats = read_stats(shards_dir)
    complete = len(stats) < STATS_READ and sum(s.get("count", 0) for _, s in stats) == n_todo
    return classify(results, todo, cfg.download, complete=complete)


def read_stats(shards_dir: str) -> list[tuple[str, dict]]:
    """(file, content) of img2dataset's per-shard _stats.json, in shard order (the first STATS_READ)."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(shards_dir)
    files = sorted(fs.glob(f"{path}/*_stats.json"))[:STATS_READ]
    return [(f, json.loads(fs.cat(f))) for f in files]


TOP_CONNECTION_HOSTS = 20


def connection_stats(shards_dir: str) -> dict:
    """The fetch's connections, summed over the shards' <shard>_connections.json (net/fetch.py:
    GuardedDownloader): totals, and the hosts with the most requests (aggregates only)."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(shards_dir)
    by_host: dict[str, dict[str, int]] = {}
    for file in fs.glob(f"{path}/*_connections.json"):
        for host, figures in json.loads(fs.cat(file)).items():
            mine = by_host.setdefault(host, {})
            for key, n in figures.items():
                mine[key] = mine.get(key, 0) + n
    if not by_host:
        return {}

    def per_connection(f: dict) -> dict:
        return {**f, "requests_per_connection": round(f["requests"] / f["connections"], 2) if f["connections"] else None}
    keys = ("connections", "tls_handshakes", "requests", "reused")
    total = {k: sum(f.get(k, 0) for f in by_host.values()) for k in keys}
    top = sorted(by_host.items(), key=lambda kv: (-kv[1].get("requests", 0), kv[0]))[:TOP_CONNECTION_HOSTS]
    return {"hosts": len(by_host), **per_connection(total), "top_hosts": {h: per_connection(f) for h, f in top}}


def shard_stats(shards_dir: str) -> dict:
    """img2dataset's per-shard _stats.json, summed (and listed when there are few)."""
    read = read_stats(shards_dir)
    files, stats = [f for f, _ in read], [s for _, s in read]
    keys = ("count", "successes", "failed_to_download", "failed_to_resize")
    total = {k: sum(s.get(k, 0) for s in stats) for k in keys}
    seconds = max((s["end_time"] for s in stats), default=0) - min((s["start_time"] for s in stats), default=0)
    total.update(shards=len(files), seconds=round(seconds, 2),
                 rows_per_second=round(total["count"] / seconds, 1) if seconds > 0 else None)
    if len(stats) <= 20:
        print(f"{'shard':>6} {'rows':>6} {'ok':>6} {'dl fail':>8} {'decode fail':>11} {'seconds':>8}")
        for f, s in zip(files, stats):
            print(f"{f.rsplit('/', 1)[-1].split('_')[0]:>6} {s['count']:>6} {s['successes']:>6} "
                  f"{s['failed_to_download']:>8} {s['failed_to_resize']:>11} {s['duration']:>8.1f}")
    return total


class Timer:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _check(cfg, input_root) -> None:
    from capfilt.net.fetch import check_ca_bundle
    from capfilt.net.netguard import check_allow_list
    check_allow_list(cfg.download.allow_hosts)
    check_ca_bundle(cfg.download.ca_bundle)


DEFINITION = Stage(
    name=STAGE, reads=None, adds=None, reasons=REASONS, split=None, run=run, source=input_source,
    preflight=preflight, help="fetch the images of a LAION-style dump with img2dataset on Spark",
    command="capfilt.jobs.download", filters=(PREFILTER,), costly=("download",), keeps_scores=True,
    runtime=FETCH_ONLY, check=_check,
    inspect=(Section("download_failures", "Download failures", download_failures, failure_map, failure_html),))
