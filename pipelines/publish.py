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

from capfilt.pipelines.output import (MANIFEST, ConservationError, Counts, manifest_digest, move_into_place,
                                      read_manifest, versions)
from capfilt.schemas import CURATED, REJECTS

def stage_dir(out_root: str, stage: str) -> str:
    return f"{str(out_root).rstrip('/')}/stages/{stage}"


def run_chain(out_root: str) -> tuple[str, ...]:
    """The stages of the committed run under out_root, in order, as its last stage's manifest names them."""
    from capfilt.pipelines.output import output_kind
    from capfilt.pipelines.registry import names
    for stage in reversed(names()):
        if output_kind(stage_dir(out_root, stage)) == stage:
            last = read_manifest(stage_dir(out_root, stage))
            if "chain" in last:
                return tuple(name for name, _ in last["chain"])
    raise ValueError(f"{out_root}/stages holds no committed chain: run `capfilt curate` into it")


def split_filters(stages: dict) -> dict:
    """The funnel's stages with each filter step as a step of its own (the prefilter): it runs inside
    the stage that declares it, on its input (its rows are never fetched), and that stage's counts hold
    its rejects under the filter's name."""
    from capfilt.pipelines.registry import definition
    result = {}
    for name, entry in stages.items():
        counts = entry.get("counts", {})
        for f in definition(name).filters:
            dropped = counts.get("rejected", {}).get(f.name)
            if not dropped:
                continue
            n = sum(dropped.values())
            rest = {k: v for k, v in counts["rejected"].items() if k != f.name}
            result[f.name] = {"counts": {"input": counts["input"], "output": counts["input"] - n,
                                         "rejected": {f.name: dropped}, "rejected_total": n},
                              "seconds": (entry.get("timings") or {}).get(f.name), "rows_in": counts["input"],
                              "rows_out": counts["input"] - n, "reused": entry.get("reused")}
            counts = {**counts, "input": counts["input"] - n, "rejected": rest,
                      "rejected_total": sum(sum(r.values()) for r in rest.values())}
            entry = {**entry, "counts": counts, "rows_in": counts["input"]}
        result[name] = entry
    return result


def check_chain(manifests: dict[str, dict]) -> None:
    """Each stage reads exactly what the previous one wrote."""
    names = list(manifests)
    for before, after in zip(names, names[1:]):
        wrote, read = manifests[before]["counts"]["output"], manifests[after]["counts"]["input"]
        if wrote != read:
            raise ConservationError(
                f"stage {after} read {read} rows but {before} wrote {wrote}: the stage outputs under stages/ "
                f"do not belong to one run. Rerun with --overwrite. Nothing was committed.")


def publish(spark, out_root: str, config: dict, compression: str = "zstd", target_file_mb: int = 256,
            started: float | None = None, reused: tuple[str, ...] = (), chain: tuple[str, ...] = ()) -> dict:
    """Commit OUT from its committed stage outputs; returns the manifest written. `reused`: the stages
    this run took from an earlier one (the manifest says so); `chain`: the stages this run ran (default:
    as the last committed stage's manifest names them; a folder a stage switched off since left is not read)."""
    from capfilt.pipelines.io import count_rejects, parquet_rows
    from capfilt.pipelines.stage import PART, Chain, folder_bytes, rates, view
    root = str(out_root).rstrip("/")
    started = time.time() if started is None else started
    fs, path = fsspec.core.url_to_fs(root)
    proto = root.split("://")[0] + "://" if "://" in root else ""
    chain_stages = tuple(chain) or run_chain(root)
    manifests = {stage: read_manifest(stage_dir(root, stage)) for stage in chain_stages}
    # What OUT is written from: a stage committed again later (a stage command, a copy) makes OUT stale.
    digests = {stage: manifest_digest(stage_dir(root, stage)) for stage in chain_stages}
    check_chain(manifests)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")  # from here on, OUT is not finished until the new manifest lands
    codec = "uncompressed" if compression == "none" else compression
    work = f"{path}/.publish.inprogress"
    if fs.exists(work):
        fs.rm(work, recursive=True)  # left by a killed run
    write_started = time.time()
    try:
        # One pass over the download data, part by part: each part's images joined with the small
        # metadata every stage added for it (broadcast), so image bytes are never shuffled.
        last = chain_stages[-1]
        chain = Chain.of(stage_dir(root, last), manifests[last], 0)
        for i, part in enumerate(chain.parts):
            size = sum(fs.size(f.split("://")[-1]) for f in chain.files(i))
            curated = view(spark, chain, part=i, images=True).drop("synthetic_captions", PART)
            CURATED.validate(curated, where=f"the curated rows of part {i}")
            curated.coalesce(max(1, math.ceil(size / (target_file_mb * 2**20)))).write \
                .option("compression", codec).mode("append").parquet(f"{proto}{work}/curated")
        rejects = None
        for stage in chain_stages:
            part = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{proto}{stage_dir(path, stage)}/rejects")
            part = part.select(*REJECTS.names)
            rejects = part if rejects is None else rejects.unionByName(part)
        rejects.coalesce(max(1, len(chain.parts))).write.option("compression", codec).parquet(f"{proto}{work}/rejects")

        counts = Counts(input=manifests[chain_stages[0]]["counts"]["input"],
                        output=parquet_rows(f"{proto}{work}/curated"),
                        rejected=count_rejects(spark, f"{proto}{work}/rejects"))
        counts.check()
        shards = [{"file": info["name"].rsplit("/", 1)[-1], "bytes": info["size"]}
                  for info in sorted(fs.ls(f"{work}/curated", detail=True), key=lambda i: i["name"])
                  if info["name"].endswith(".parquet")]
        written = folder_bytes(f"{proto}{work}")
        for name in ("curated", "rejects"):
            move_into_place(fs, f"{work}/{name}", f"{path}/{name}")
    finally:
        if fs.exists(work):
            fs.rm(work, recursive=True)
    stages = {}
    for stage, m in manifests.items():
        figures = m.get("figures", {}) | rates(m)
        if "timings" in m:  # the first stage: its images are its bytes
            figures["bytes_written"] = folder_bytes(stage_dir(root, stage))
            figures["timings"] = m.get("timings")
        stages[stage] = {key: m.get(key) for key in ("started_at", "finished_at", "counts")} | figures | \
            {"reused": stage in reused}
    stages = split_filters(stages)
    write_seconds = round(time.time() - write_started, 3)
    rows_in = sum(p["rows"] for p in chain.parts)
    write = {"seconds": write_seconds, "rows_in": rows_in, "rows_out": counts.output, "bytes_written": written,
             "model_passes": {}, "rows_per_s": round(rows_in / write_seconds, 2) if write_seconds else None}
    finished = time.time()
    manifest = {
        "stage": "curate",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "seconds": round(finished - started, 3),
        "versions": versions(),
        "config": config,
        "models": {stage: manifests[stage]["models"] for stage in chain_stages if "models" in manifests[stage]},
        "counts": counts.to_dict(),
        "stages": stages,
        "write": write,
        "reasons": {stage: manifests[stage].get("reasons", {}) for stage in chain_stages} |
                   {name: step["reasons"] for s in chain_stages
                    for name, step in manifests[s].get("filters", {}).items() if name in stages},
        "curated_files": shards,
        "stage_manifests": digests,
    }
    fs.pipe(f"{path}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())
    return manifest
