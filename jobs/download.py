"""`capfilt download` / `spark-submit jobs/download.py`: fetch the images of a LAION-style dump.

Writes OUTPUT/data (downloaded records), OUTPUT/rejects (every other row, with its reason),
OUTPUT/manifest.json and OUTPUT/input (the prepared input, kept for --retry-failed).
A killed run resumes where it stopped (finished img2dataset shards are skipped) when rerun with
the same input and settings. --retry-failed re-downloads only rows that failed with a retryable
reason (5xx, timeout, reset, refused, failed shard, a host given up after Retry-After, an unreachable
robots.txt: asked again first) and merges them into the committed output.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time

from capfilt.jobs.common import add_config_args, check_output_path, config_from_args, reuse_committed, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="capfilt download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, output="stage output directory",
                   retry="re-download the retryable failures of a committed output and merge them")
    return p


def add_input_args(p: argparse.ArgumentParser, output: str, retry: str) -> None:
    """The arguments of a run that starts from a metadata dump (download and curate)."""
    p.add_argument("--input", required=True, help="metadata: a parquet/csv/jsonl file, a folder or a glob")
    p.add_argument("--output", required=True, help=output)
    p.add_argument("--input-format", default="auto", choices=["auto", "parquet", "csv", "jsonl"])
    p.add_argument("--preset", default="default", choices=["default", "laion"],
                   help="column names: default (url, caption) or laion (URL, TEXT, SAMPLE_ID)")
    p.add_argument("--url-col", help="column holding the image URL")
    p.add_argument("--caption-col", help="column holding the caption")
    p.add_argument("--id-col", help="column holding a unique row id (else uid = hash of url+caption)")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="let this private/loopback endpoint through the address policy (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help=retry)
    p.add_argument("--no-progress", action="store_true", help="no periodic progress lines")
    add_config_args(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.download.allow_hosts = [*cfg.download.allow_hosts, *args.allow_host]
    spec = input_spec(args)
    check(spec, args.output, cfg, retry=args.retry_failed)
    from capfilt.pipelines.output import check_replaceable, enclosing_lock
    check_replaceable(args.output, "download")
    with enclosing_lock(args.output):  # OUT/stages/download of a curate output: OUT goes stale
        run_download(cfg, spec, args.output, args.retry_failed, progress=not args.no_progress)
    return 0


def run_download(cfg, spec, output: str, retry: bool = False, progress: bool = True) -> None:
    """The download stage's lifecycle (checked arguments): reuse, retry or fetch, then commit."""
    from capfilt.pipelines.download import STAGE
    from capfilt.pipelines.output import OutputLock, StageOutput
    from capfilt.pipelines.provenance import input_source
    from capfilt.pipelines.session import spark_session

    out = StageOutput(output, STAGE, overwrite=cfg.output.overwrite)
    if retry:
        if not out.complete:
            raise ValueError(f"--retry-failed needs a committed download at {output}; run without it first")
        refuse_stale_retry(out, cfg)
    elif reuse_committed(out, cfg, STAGE, input_source(spec)):
        return
    with OutputLock(output):
        spark = spark_session(cfg.spark)
        print(f"Spark UI: {spark.sparkContext.uiWebUrl}", flush=True)
        if retry:
            counts = retry_failed(spark, out, cfg, progress=progress)
        else:
            counts = download(spark, spec, out, cfg, progress=progress)
    print_funnel(counts, output)


def input_spec(args):
    from capfilt.pipelines.inputs import InputSpec
    spec = InputSpec.from_preset(args.input, args.preset, url_col=args.url_col, caption_col=args.caption_col,
                                 id_col=args.id_col)
    return InputSpec(**{**spec.__dict__, "format": args.input_format})


def check(spec, output: str, cfg, retry: bool = False, replaced: tuple[str, ...] = ("",)) -> None:
    """Everything about the arguments that can be wrong, checked before Spark starts: one line each.
    A retry reads the input the committed output kept, not --input."""
    from capfilt.pipelines.inputs import check_input
    from capfilt.pipelines.prefilter import check_settings
    from capfilt.udfs.netguard import check_allow_list
    if not retry:
        check_input(spec)
        check_settings(cfg)
    check_output_path(output, None if retry else spec.path, replaced)
    check_allow_list(cfg.download.allow_hosts)


def refuse_stale_retry(out, cfg) -> None:
    """--retry-failed merges new rows into a committed download (from the input it kept): only fetch
    settings may differ."""
    from capfilt.pipelines.download import STAGE
    from capfilt.pipelines.output import read_manifest
    from capfilt.pipelines.provenance import FETCH_ONLY, stale_reason
    why = stale_reason(read_manifest(out.root), cfg.to_dict(), STAGE)
    if why:
        raise ValueError(f"--retry-failed on {out.root}: it was downloaded with {why}; a retry may change only "
                         f"how rows are fetched ({', '.join(sorted(FETCH_ONLY))}). Rerun with --overwrite to "
                         f"download everything again")


def _fingerprint(spec, cfg) -> str:
    """What a killed run's work depends on: the input (files included), the download and prefilter settings."""
    from capfilt.pipelines.provenance import input_source
    return hashlib.sha256(json.dumps([input_source(spec), cfg.download.__dict__, cfg.prefilter.__dict__],
                                     sort_keys=True, default=str).encode()).hexdigest()


def download(spark, spec, out, cfg, progress=True):
    import fsspec

    from capfilt.pipelines.download import (fetch, precheck, prechecked_rejects, robots_refusals, robots_rejects,
                                            shard_size, to_fetch)
    from capfilt.pipelines.stage import definition
    from capfilt.pipelines.inputs import read_pairs
    from capfilt.pipelines.io import parquet_rows, write_stage
    from capfilt.pipelines.output import build_manifest
    from capfilt.pipelines.provenance import input_source

    timer = Timer()
    out.begin(resume=True, force=True)
    fs = fsspec.core.url_to_fs(out.path(""))[0]
    prepared_file = out.path("prepared.json").split("://")[-1]
    fingerprint = _fingerprint(spec, cfg)
    prepared = json.loads(fs.cat(prepared_file)) if fs.exists(prepared_file) else None
    if prepared and prepared["fingerprint"] != fingerprint:
        print("The unfinished run at this output used other input or settings: starting over.")
        out.begin(resume=False, force=True)
        prepared = None
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
        marked = spark.read.parquet(out.path("prechecked"))
        n_input = parquet_rows(out.path("prechecked"))
        todo = to_fetch(marked)
        prefiltered = None
        if definition("prefilter").enabled(cfg):  # before robots.txt and the plan: its rows are never fetched
            timer.lap("precheck")
            facts = {"models": {}}
            definition("prefilter").split(todo, cfg, facts)[1].write.mode("overwrite").parquet(out.path("prefilter"))
            todo = todo.join(spark.read.parquet(out.path("prefilter")).select("uid"), "uid", "left_anti")
            prefiltered = facts["models"]["prefilter"]
            timer.lap("prefilter")
        parallelism = cfg.download.processes or spark.sparkContext.defaultParallelism
        limited = has_limited_hosts(todo, cfg.download)
        # img2dataset shards each input file on its own: few large files, not one per Spark partition.
        files = max(1, math.ceil(n_input / (cfg.download.rows_per_shard * 10)))
        # OUT/input (kept for --retry-failed) holds every row that may be fetched, robots.txt's refusals
        # included: the rows of an unreachable robots.txt are retried. The fetch reads fetch_input.
        todo.coalesce(files).write.mode("overwrite").parquet(out.path("input"))
        fetch_input = "input"
        if limited and cfg.download.robots_txt:
            robots_refusals(spark.read.parquet(out.path("input")), cfg.download, parallelism) \
                .write.mode("overwrite").parquet(out.path("robots"))
            fetch_input = "fetch_input"
            spark.read.parquet(out.path("input")).join(spark.read.parquet(out.path("robots")).select("uid"), "uid",
                                                       "left_anti").coalesce(files) \
                .write.mode("overwrite").parquet(out.path(fetch_input))
        n_todo = parquet_rows(out.path(fetch_input))
        rows = shard_size(n_todo, parallelism, cfg.download)
        prepared = {"fingerprint": fingerprint, "input_rows": n_input, "todo": n_todo, "rows_per_shard": rows,
                    "robots": limited and cfg.download.robots_txt, "prefilter": prefiltered, "fetch_input": fetch_input,
                    "plan": planned(spark, out, fetch_input, n_todo, rows, parallelism, cfg.download, limited)}
        fs.pipe(prepared_file, json.dumps(prepared).encode())
    timer.lap("prepare")
    fetch_input = prepared.get("fetch_input", "input")
    todo = spark.read.parquet(out.path(fetch_input))
    extras = [c for c in todo.columns if c not in ("uid", "url", "caption")]
    if prepared["todo"]:
        fetch(spark, out.path(fetch_input), out.path("shards"), extras, cfg.download, prepared["rows_per_shard"],
              progress=progress, plan=prepared["plan"])
        results = spark.read.option("pathGlobFilter", "*.parquet").parquet(out.path("shards"))
    else:
        results = None
    timer.lap("fetch")
    downloaded, failed = _classified(spark, results, todo, cfg, prepared["todo"], out.path("shards"))
    rejects = prechecked_rejects(spark.read.parquet(out.path("prechecked"))).unionByName(failed)
    if prepared["robots"]:
        rejects = rejects.unionByName(robots_rejects(spark.read.parquet(out.path("robots"))))
    if prepared.get("prefilter"):
        rejects = rejects.unionByName(spark.read.parquet(out.path("prefilter")))
    counts = write_stage(out, downloaded, rejects, prepared["input_rows"], cfg.output.compression)
    timer.lap("write")
    shards = shard_stats(out.path("shards")) if prepared["todo"] else {}
    manifest = build_manifest(out, cfg.to_dict(), counts, input=spec.__dict__, source=input_source(spec),
                              shards=shards, reasons=_reasons(), timings=timer.laps,
                              **({"prefilter": prepared["prefilter"]} if prepared.get("prefilter") else {}))
    for work in ("shards", "prechecked", "robots", "fetch_input", "prefilter", "plan", "prepared.json"):
        out.remove(work)
    out.commit(manifest)
    return counts


def retry_failed(spark, out, cfg, progress=True):
    """Fetch the retryable rejects again into a new in-progress version and commit the merge. Their
    hosts' robots.txt is asked again first (when robots_txt is on): a verdict is not kept for days (RFC
    9309 2.4), and an unreachable robots.txt disallowed its host for that run only."""
    from capfilt.pipelines.download import fetch, retryable, robots_refusals, robots_rejects, shard_size
    from capfilt.pipelines.io import parquet_rows, read_rejects, write_stage
    from capfilt.pipelines.output import build_manifest, read_manifest

    committed = read_manifest(out.root)
    old_data = spark.read.parquet(f"{out.root}/data")
    old_rejects = read_rejects(spark, out.root)
    old_input = spark.read.parquet(f"{out.root}/input")
    retry = retryable(old_rejects).select("uid")
    out.begin(resume=False, force=True)
    todo = old_input.join(retry, "uid", "left_semi")
    todo.write.mode("overwrite").parquet(out.path("retry_input"))
    n_retry = parquet_rows(out.path("retry_input"))
    print(f"Retrying {n_retry} rows that failed with a retryable reason.")
    old_input.write.mode("overwrite").parquet(out.path("input"))
    parallelism = cfg.download.processes or spark.sparkContext.defaultParallelism
    to_fetch, n_fetch, refused = "retry_input", n_retry, None
    limited = n_retry and has_limited_hosts(spark.read.parquet(out.path("retry_input")), cfg.download)
    if limited and cfg.download.robots_txt:
        robots_refusals(spark.read.parquet(out.path("retry_input")), cfg.download, parallelism) \
            .write.mode("overwrite").parquet(out.path("robots"))
        refused = spark.read.parquet(out.path("robots"))
        spark.read.parquet(out.path("retry_input")).join(refused.select("uid"), "uid", "left_anti") \
            .write.mode("overwrite").parquet(out.path("retry_fetch"))
        to_fetch = "retry_fetch"
        n_fetch = parquet_rows(out.path(to_fetch))
    if n_fetch:
        rows = shard_size(n_fetch, parallelism, cfg.download)
        extras = [c for c in old_input.columns if c not in ("uid", "url", "caption")]
        plan = planned(spark, out, to_fetch, n_fetch, rows, parallelism, cfg.download, limited)
        fetch(spark, out.path(to_fetch), out.path("shards"), extras, cfg.download, rows, progress=progress,
              plan=plan)
        results = spark.read.option("pathGlobFilter", "*.parquet").parquet(out.path("shards"))
    else:
        results = None
    new_data, new_failed = _classified(spark, results, spark.read.parquet(out.path(to_fetch)), cfg, n_fetch,
                                       out.path("shards"))
    if refused is not None:
        new_failed = new_failed.unionByName(robots_rejects(refused))
    # An output whose first run fetched nothing may lack the input's extra columns (empty: nothing to lose).
    data = old_data.unionByName(new_data, allowMissingColumns=True)
    rejects = old_rejects.join(retry, "uid", "left_anti").unionByName(new_failed)
    counts = write_stage(out, data, rejects, committed["counts"]["input"], cfg.output.compression)
    manifest = build_manifest(out, cfg.to_dict(), counts, input=committed.get("input"),
                              source=committed.get("source"),
                              shards=committed.get("shards", {}), reasons=_reasons(),
                              retries=[*committed.get("retries", []),
                                       {"retried": n_retry, "recovered": counts.output - committed["counts"]["output"]}])
    for work in ("shards", "retry_input", "retry_fetch", "robots", "plan"):
        out.remove(work)
    out.commit(manifest)
    return counts


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


STATS_READ = 10_000


def read_stats(shards_dir: str) -> list[tuple[str, dict]]:
    """(file, content) of img2dataset's per-shard _stats.json, in shard order (the first STATS_READ)."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(shards_dir)
    files = sorted(fs.glob(f"{path}/*_stats.json"))[:STATS_READ]
    return [(f, json.loads(fs.cat(f))) for f in files]


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


def _reasons():
    from capfilt.pipelines.download import REASONS
    return REASONS


def print_funnel(counts, where: str) -> None:
    print(f"\n{where}: {counts.input} rows in, {counts.output} downloaded, {counts.rejected_total} rejected")
    for stage, reasons in sorted(counts.rejected.items()):
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<10} {reason:<22} {n:>8}")


if __name__ == "__main__":
    sys.exit(run(main))
