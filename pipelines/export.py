"""Training manifests from OUT/curated, for the loaders trainers already use.

    webdataset   DIR/shard-00000.tar ...: <key>.jpg|png|webp (image bytes), <key>.txt (caption_primary),
                 <key>.json (uid, url, web caption, size, sha256, candidates); DIR/shards.txt and
                 DIR/export.json with the brace pattern and sample count open_clip takes as
                 --train-data / --train-num-samples
    csv          DIR/images/<key>.<ext> + DIR/train.csv: tab-separated `filepath` (absolute) and `title`,
                 open_clip's csv loader defaults (--csv-separator '\\t', filepath, title)
    json         DIR/images/<key>.<ext> + DIR/annotations.json: [{"image", "caption", "image_id"}], the
                 LAVIS/BLIP caption dataset format (image paths relative to DIR/images)

Executors write the files, one shard or part per Spark partition (rows in uid order); the driver
only gathers (part, count) rows, renumbers the shards, joins the small text parts by streaming, and
moves the finished folder into place (a killed export leaves only a hidden `.NAME.inprogress`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import pandas as pd  # module level: pandas UDF type hints are resolved in these globals

FORMATS = ("webdataset", "csv", "json")
COLUMNS = ["uid", "url", "caption", "image", "width", "height", "sha256", "candidates", "caption_primary"]


def image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError(f"image bytes of an unknown format (starts {data[:12]!r}): not one the loaders read")


def _metadata(row) -> dict:
    return {"uid": row.uid, "url": row.url, "caption": row.caption, "width": int(row.width),
            "height": int(row.height), "sha256": row.sha256,
            "candidates": [{"text": c["text"], "source": c["source"],
                            "score": None if c["score"] is None else float(c["score"]), "kept": bool(c["kept"])}
                           for c in row.candidates]}


def _writer(fmt: str, folder: str, final: str):
    """The per-partition function: writes one shard (webdataset) or one text part plus image files
    (csv, json) into folder, and yields one (part, samples) row. CSV paths name the final folder."""
    def write(frames):
        from pyspark import TaskContext
        part = TaskContext.get().partitionId()
        root = Path(folder)
        samples, position = 0, 0
        if fmt == "webdataset":
            name = f"part-{part:05d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for frame in frames:
                    for row in frame.itertuples(index=False):
                        key = f"{part:05d}{position:07d}"
                        position += 1
                        for suffix, body in ((image_extension(row.image), row.image),
                                             ("txt", row.caption_primary.encode()),
                                             ("json", json.dumps(_metadata(row), ensure_ascii=False).encode())):
                            info = tarfile.TarInfo(f"{key}.{suffix}")
                            info.size, info.mtime, info.mode = len(body), 0, 0o644
                            tar.addfile(info, io.BytesIO(body))
                        samples += 1
        else:
            name = f"part-{part:05d}.{'tsv' if fmt == 'csv' else 'jsonl'}"
            images = root / "images"
            with open(root / "parts" / name, "w", encoding="utf-8", newline="") as out:
                table = csv.writer(out, delimiter="\t", lineterminator="\n")
                for frame in frames:
                    for row in frame.itertuples(index=False):
                        file = f"{part:05d}{position:07d}.{image_extension(row.image)}"
                        position += 1
                        (images / file).write_bytes(row.image)
                        if fmt == "csv":
                            table.writerow([f"{final}/images/{file}", row.caption_primary])
                        else:
                            out.write(json.dumps({"image": file, "caption": row.caption_primary,
                                                  "image_id": row.uid}, ensure_ascii=False) + "\n")
                        samples += 1
        if samples == 0:
            (root / ("parts" if fmt != "webdataset" else "") / name).unlink()
        else:
            yield pd.DataFrame({"part": [name], "samples": [samples]})
    return write


def export(spark, out_root: str, fmt: str, to: str, samples_per_shard: int = 10_000,
           overwrite: bool = False) -> dict:
    """Write the export to `to` (a local or shared folder every executor can write); returns its summary."""
    from pipelines.output import read_manifest
    from schemas import CURATED

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    source = read_manifest(out_root)  # refuses an unfinished OUT
    target = Path(to).resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{target} exists and is not empty: choose another folder or pass --overwrite")
    work = target.parent / f".{target.name}.inprogress"
    if work.exists():
        shutil.rmtree(work)  # left by a killed export
    (work / "images").mkdir(parents=True) if fmt != "webdataset" else work.mkdir(parents=True)
    if fmt != "webdataset":
        (work / "parts").mkdir()

    curated = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{str(out_root).rstrip('/')}/curated")
    CURATED.validate(curated, where=f"{out_root}/curated")
    n = source["counts"]["output"]
    shards = max(1, math.ceil(n / samples_per_shard))
    rows = curated.select(*COLUMNS).repartitionByRange(shards, "uid").sortWithinPartitions("uid")
    parts = (rows.mapInPandas(_writer(fmt, str(work), str(target)), "part string, samples long")
             .toPandas().sort_values("part").reset_index(drop=True))  # one small row per shard
    total = int(parts.samples.sum())
    if total != n:
        raise RuntimeError(f"exported {total} samples but {out_root} has {n} curated rows: nothing was committed")

    summary = {"format": fmt, "source": str(out_root), "source_finished_at": source.get("finished_at"),
               "samples": total}
    if fmt == "webdataset":
        names = [f"shard-{i:05d}.tar" for i in range(len(parts))]
        for part, name in zip(parts.part, names):
            (work / part).rename(work / name)
        (work / "shards.txt").write_text("".join(f"{target / name}\n" for name in names))
        pattern = f"shard-{{00000..{len(names) - 1:05d}}}.tar" if len(names) > 1 else names[0]
        summary.update(shards=len(names), samples_per_shard=parts.samples.tolist(),
                       train_data=str(target / pattern), train_num_samples=total)
    else:
        name = "train.csv" if fmt == "csv" else "annotations.json"
        with open(work / name, "w", encoding="utf-8", newline="") as out:
            if fmt == "csv":
                out.write("filepath\ttitle\n")
            else:
                out.write("[\n")
            first = True
            for part in parts.part:
                with open(work / "parts" / part, encoding="utf-8", newline="") as piece:
                    for line in piece if fmt == "json" else [piece.read()]:
                        if fmt == "csv":
                            out.write(line)
                        else:
                            out.write(("" if first else ",\n") + line.rstrip("\n"))
                            first = False
            if fmt == "json":
                out.write("\n]\n")
        shutil.rmtree(work / "parts")
        summary.update({"file": str(target / name), "images": str(target / "images")})
    (work / "export.json").write_text(json.dumps(summary, indent=2))
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    return summary
