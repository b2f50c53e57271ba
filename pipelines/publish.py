"""The write step of `capfilt curate`: committed stage outputs -> OUT/curated, OUT/rejects, OUT/manifest.json.

    OUT/stages/<stage>/   each stage's committed output (kept: a rerun resumes from them)
    OUT/curated/          the dedup stage's records, rewritten as files of about target_file_mb
    OUT/rejects/          every stage's rejects in one table (stage, reason, detail, duplicate_of)
    OUT/manifest.json     written last: config, versions, models, timings, counts

OUT counts as finished only while manifest.json exists: it is removed before anything under OUT is
replaced and written again only after the counts add up (input == curated + rejected, counted from
the files written). When they do not, nothing is committed and ConservationError names the gap.
docs/output.md describes the layout.
"""
from __future__ import annotations

import json
import math
import time

import fsspec

from pipelines.output import MANIFEST, ConservationError, Counts, read_manifest, versions
from schemas import CURATED, REJECTS

STAGES = ("download", "caption", "filter", "dedup")


def stage_dir(out_root: str, stage: str) -> str:
    return f"{str(out_root).rstrip('/')}/stages/{stage}"


def check_chain(manifests: dict[str, dict]) -> None:
    """Each stage reads exactly what the previous one wrote."""
    for before, after in zip(STAGES, STAGES[1:]):
        wrote, read = manifests[before]["counts"]["output"], manifests[after]["counts"]["input"]
        if wrote != read:
            raise ConservationError(
                f"stage {after} read {read} rows but {before} wrote {wrote}: the stage outputs under stages/ "
                f"do not belong to one run. Rerun with --overwrite. Nothing was committed.")


def _data_bytes(fs, path: str) -> int:
    return sum(info["size"] for info in fs.ls(path, detail=True) if info["name"].endswith(".parquet"))


def publish(spark, out_root: str, config: dict, compression: str = "zstd", target_file_mb: int = 256,
            started: float | None = None) -> dict:
    """Commit OUT from its four committed stage outputs; returns the manifest written."""
    root = str(out_root).rstrip("/")
    started = time.time() if started is None else started
    fs, path = fsspec.core.url_to_fs(root)
    proto = root.split("://")[0] + "://" if "://" in root else ""
    manifests = {stage: read_manifest(stage_dir(root, stage)) for stage in STAGES}
    check_chain(manifests)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")  # from here on, OUT is not finished until the new manifest lands
    codec = "uncompressed" if compression == "none" else compression
    work = f"{path}/.publish.inprogress"
    if fs.exists(work):
        fs.rm(work, recursive=True)  # left by a killed run
    try:
        dedup_data = f"{stage_dir(path, 'dedup')}/data"
        files = max(1, math.ceil(_data_bytes(fs, dedup_data) / (target_file_mb * 2**20)))
        curated = spark.read.option("pathGlobFilter", "*.parquet").parquet(proto + dedup_data)
        CURATED.validate(curated, where=dedup_data)
        curated.repartition(files).write.option("compression", codec).parquet(f"{proto}{work}/curated")
        rejects = None
        for stage in STAGES:
            part = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{proto}{stage_dir(path, stage)}/rejects")
            part = part.select(*REJECTS.names)
            rejects = part if rejects is None else rejects.unionByName(part)
        rejects.coalesce(max(1, files)).write.option("compression", codec).parquet(f"{proto}{work}/rejects")

        rejected: dict[str, dict[str, int]] = {}
        for row in spark.read.parquet(f"{proto}{work}/rejects").groupBy("stage", "reason").count().collect():
            rejected.setdefault(row["stage"], {})[row["reason"]] = row["count"]
        counts = Counts(input=manifests["download"]["counts"]["input"],
                        output=spark.read.parquet(f"{proto}{work}/curated").count(), rejected=rejected)
        counts.check()
        shards = [{"file": info["name"].rsplit("/", 1)[-1], "bytes": info["size"]}
                  for info in sorted(fs.ls(f"{work}/curated", detail=True), key=lambda i: i["name"])
                  if info["name"].endswith(".parquet")]
        for name in ("curated", "rejects"):
            if fs.exists(f"{path}/{name}"):
                fs.rm(f"{path}/{name}", recursive=True)
            fs.mv(f"{work}/{name}", f"{path}/{name}", recursive=True)
    finally:
        if fs.exists(work):
            fs.rm(work, recursive=True)
    finished = time.time()
    manifest = {
        "stage": "curate",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "seconds": round(finished - started, 3),
        "versions": versions(),
        "config": config,
        "models": {stage: manifests[stage]["models"] for stage in STAGES if "models" in manifests[stage]},
        "counts": counts.to_dict(),
        "stages": {stage: {key: m.get(key) for key in ("started_at", "finished_at", "seconds", "counts")}
                   for stage, m in manifests.items()},
        "reasons": {stage: manifests[stage].get("reasons", {}) for stage in STAGES},
        "curated_files": shards,
    }
    fs.pipe(f"{path}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())
    return manifest
