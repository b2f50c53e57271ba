"""Training manifests from OUT/curated, for the loaders trainers already use.

    webdataset   DIR/shard-00000.tar ...: <key>.jpg|png|webp (image bytes), <key>.txt (the sample's caption),
                 <key>.json (uid, url, web caption, size, sha256, candidates, caption_source; balance_entries and
                 balance_prob when the run balanced: udfs/balance.py keep_in_epoch); DIR/shards.txt and
                 DIR/export.json with the brace pattern and sample count open_clip takes as
                 --train-data / --train-num-samples
    csv          DIR/images/<key>.<ext> + DIR/train.csv: tab-separated `filepath` (absolute) and `title`,
                 open_clip's csv loader defaults (--csv-separator '\\t', filepath, title)
    json         DIR/images/<key>.<ext> + DIR/annotations.json: [{"image", "caption", "image_id"}], the
                 LAVIS/BLIP caption dataset format (image paths relative to DIR/images)

Which caption each sample trains on (`captions`, CAPTIONS): `primary` (caption_primary, one sample per
row), `web` or `synthetic` (the row's own kept caption of that source, the best-scored one; a row without
one is left out and counted), `all` (every kept caption its own sample, those inherited from the duplicates
the row replaced included, as BLIP trains: the image repeats), or
`mix` (per row a seeded draw picks synthetic with probability `synthetic_share`, else web; a row without
a kept caption of the drawn source takes the other, counted as a fallback: Recap-DataComp's mix).

Every sample gets a global index (per-partition counts, gathered as one small row per input partition,
give each partition its offset); the key is that index, zero-padded: unique, no dots, a safe file
name. Shard k holds indices [k*n, (k+1)*n), so every shard but the last has exactly n samples.
Executors write the files (mapInPandas, one Spark partition writes whole shards or one text part);
the driver only gathers (file, count) rows, joins the small text parts by streaming, and moves the
finished folder into place: a killed export leaves only a hidden `.NAME.inprogress`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tarfile
from pathlib import Path

import pandas as pd  # module level: pandas UDF type hints are resolved in these globals

FORMATS = ("webdataset", "csv", "json")
COLUMNS = ["uid", "url", "caption", "image", "width", "height", "sha256", "candidates", "caption_primary"]
CAPTIONS = ("primary", "web", "synthetic", "all", "mix")
SYNTHETIC_SHARE = 0.8  # mix's default: Recap-DataComp-1B's best share for retrieval
BALANCE = ["balance_entries", "balance_prob"]  # in each sample's json when the run balanced (a loader draws on them)
KEY_DIGITS = 9  # zero-padded sample index; wider only past a billion samples, still unique
# Strings pandas.read_csv turns into NaN even when quoted (its default na_values, pandas 2.x); open_clip's
# CsvDataset then trains on the text "nan". Counted and reported, since the CSV cannot protect them.
PANDAS_NA = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                       "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"])


def image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError(f"image bytes of an unknown format (starts {data[:12]!r}): not one the loaders read")


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _metadata(row) -> dict:
    return {"uid": row.uid, "url": row.url, "caption": row.caption, "width": int(row.width),
            "height": int(row.height), "sha256": row.sha256,
            "candidates": [{"text": c["text"], "source": c["source"],
                            "score": None if c["score"] is None else float(c["score"]), "kept": bool(c["kept"])}
                           for c in row.candidates], "caption_source": row.caption_source} | (
        {"balance_entries": list(row.balance_entries), "balance_prob": float(row.balance_prob)}
        if hasattr(row, "balance_prob") else {})


class _Tally:
    """What one writer task wrote, beyond its files: samples per caption source, mix fallbacks, captions
    pandas reads as missing (csv) and the sum of the samples' keep probabilities (a balanced run)."""
    SCHEMA = "file string, samples long, na_like long, synthetic long, fallbacks long, balance_prob double"

    def __init__(self):
        self.na_like = self.synthetic = self.fallbacks = 0
        self.balance_prob = 0.0

    def add(self, row) -> None:
        self.na_like += row.text in PANDAS_NA
        self.synthetic += (row.caption_source or "").endswith("synthetic")  # inherited_synthetic too
        self.fallbacks += bool(row.fallback)
        self.balance_prob += float(getattr(row, "balance_prob", 0.0))

    def frame(self, files: list[str], samples: list[int]) -> pd.DataFrame:
        rest = [0] * (len(files) - 1)  # the tallies go on the task's first file
        return pd.DataFrame({"file": files, "samples": samples, "na_like": [self.na_like, *rest],
                             "synthetic": [self.synthetic, *rest], "fallbacks": [self.fallbacks, *rest],
                             "balance_prob": [self.balance_prob, *rest]})


def _add(tar: tarfile.TarFile, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(body), 0, 0o644
    tar.addfile(info, io.BytesIO(body))


def _shard_writer(folder: str):
    """Per partition: rows arrive sorted by index, whole shards only; one tar per shard, one
    (file, samples, tallies) row per tar."""
    def write(frames):
        root, tar, name, samples, shard = Path(folder), None, None, 0, None
        written, tally = [], _Tally()
        try:
            for frame in frames:
                for row in frame.itertuples(index=False):
                    if row.shard != shard:
                        if tar is not None:
                            tar.close()
                            written.append((name, samples))
                        shard, samples = row.shard, 0
                        name = f"shard-{shard:05d}.tar"
                        tar = tarfile.open(root / name, "w")
                    key = sample_key(row.sample_index)
                    _add(tar, f"{key}.{image_extension(row.image)}", row.image)
                    _add(tar, f"{key}.txt", row.text.encode("utf-8"))
                    _add(tar, f"{key}.json", json.dumps(_metadata(row), ensure_ascii=False).encode("utf-8"))
                    samples += 1
                    tally.add(row)
            if tar is not None:
                tar.close()
                written.append((name, samples))
        finally:
            if tar is not None and not tar.closed:
                tar.close()
        if written:
            yield tally.frame([n for n, _ in written], [s for _, s in written])
    return write


def _files_writer(fmt: str, folder: str, final: str):
    """Per partition: image files under images/ and one text part (csv rows or json lines) under
    parts/; one (file, samples, tallies) row. CSV paths name the final folder, not the work folder."""
    def write(frames):
        from pyspark import TaskContext
        root = Path(folder)
        name = f"part-{TaskContext.get().partitionId():05d}.{'tsv' if fmt == 'csv' else 'jsonl'}"
        samples, tally = 0, _Tally()
        with open(root / "parts" / name, "w", encoding="utf-8", newline="") as out:
            table = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
            for frame in frames:
                for row in frame.itertuples(index=False):
                    # One file per image: the samples of one row (`all`) name the file of its first sample,
                    # written by whichever partition holds that sample.
                    file = f"{sample_key(row.sample_index - row.caption_index)}.{image_extension(row.image)}"
                    if row.caption_index == 0:
                        (root / "images" / file).write_bytes(row.image)
                    if fmt == "csv":
                        table.writerow([f"{final}/images/{file}", row.text])
                    else:
                        out.write(json.dumps({"image": file, "caption": row.text,
                                              "image_id": row.uid}, ensure_ascii=False) + "\n")
                    samples += 1
                    tally.add(row)
        if samples == 0:
            (root / "parts" / name).unlink()
        else:
            yield tally.frame([name], [samples])
    return write


def _samples(curated, captions: str, synthetic_share: float, seed: int):
    """One row per training sample: the curated columns an export writes plus `text` (the caption
    it trains on; `caption_source`; `caption_index`, its place among its row's samples; `fallback`, a mix
    draw whose source the row had not kept)."""
    from pyspark.sql import functions as F
    columns = COLUMNS + [c for c in BALANCE if c in curated.columns]
    best_first = lambda a, b: (F.when(a["score"] > b["score"], -1).when(a["score"] < b["score"], 1)  # noqa: E731
                               .otherwise(0))  # filter.select's order: caption_primary is the first kept
    kept = lambda source: F.array_sort(F.filter("candidates", lambda c: c["kept"] & (c["source"] == source)),  # noqa: E731
                                       best_first)
    web, synthetic = F.get(kept("web"), 0), F.get(kept("synthetic"), 0)
    if captions == "primary":
        source = F.filter("candidates", lambda c: c["kept"] & (c["text"] == F.col("caption_primary")))[0]["source"]
        chosen = F.struct(F.col("caption_primary").alias("text"), source.alias("source"))
    elif captions in ("web", "synthetic"):
        chosen = web if captions == "web" else synthetic
    elif captions == "mix":
        from capfilt.pipelines.balance import uniform
        draw = uniform(seed, "export-mix") < F.lit(float(synthetic_share))
        chosen = F.when(draw, F.coalesce(synthetic, web)).otherwise(F.coalesce(web, synthetic))
        fallback = F.when(draw, synthetic.isNull()).otherwise(web.isNull())
    if captions == "all":
        every = F.filter("candidates", lambda c: c["kept"])  # inherited ones too (dedup.inherit_captions)
        samples = curated.select(*columns, F.posexplode(every).alias("caption_index", "_c"))
    else:
        samples = curated.select(*columns, F.lit(0).alias("caption_index"), chosen.alias("_c")) \
            .where(F.col("_c").isNotNull())
    return samples.select(*columns, F.col("_c.text").alias("text"), F.col("_c.source").alias("caption_source"),
                          "caption_index", (fallback if captions == "mix" else F.lit(False)).alias("fallback"))


def _indexed(samples, samples_per_shard: int):
    """(samples with a global `sample_index` and `shard`, total samples). One small job counts the samples
    of each input partition; the index is the partition's offset plus the sample's position in it (the
    same scan, so the same partitions and order, as zipWithIndex relies on)."""
    from pyspark.sql import functions as F
    columns = samples.columns
    rows = (samples.withColumn("_part", F.spark_partition_id())
            .withColumn("_id", F.monotonically_increasing_id()))
    sizes = sorted((r["_part"], r["n"]) for r in rows.groupBy("_part").agg(F.count("*").alias("n")).collect())
    offsets, total = [], 0
    for part, n in sizes:
        offsets += [F.lit(part), F.lit(total)]
        total += n
    offset = F.element_at(F.create_map(*offsets), F.col("_part")) if offsets else F.lit(0)
    position = F.col("_id") - F.shiftleft(F.col("_part").cast("long"), 33)  # monotonically_increasing_id's layout
    index = (offset.cast("long") + position).alias("sample_index")
    indexed = rows.select(*columns, index).withColumn("shard", (F.col("sample_index") / samples_per_shard).cast("long"))
    return indexed, total


# What an export writes in DIR: --overwrite replaces a folder that holds nothing else.
EXPORT_NAMES = re.compile(r"^(export\.json|shards\.txt|shard-\d{5,}\.tar|images|train\.csv|annotations\.json)$")


def _overlaps(target: Path, other: Path) -> bool:
    return target == other or target in other.parents or other in target.parents


def check_target(out_root: str, to: str, overwrite: bool) -> Path:
    """The resolved export folder, or ValueError: checked before any work (jobs/export.py calls it
    before Spark starts). Never inside OUT, OUT itself or a folder holding OUT, nor the input OUT was
    made from, around it or inside it: --overwrite replaces the target whole. A folder that is there
    must be empty or an earlier export (its export.json, and nothing an export does not write)."""
    from capfilt.pipelines.output import input_location, recorded_input
    target = Path(to).resolve()  # symlinks too: a link into OUT is inside OUT
    source = Path(out_root).resolve() if "://" not in str(out_root) else None
    if source is not None and (target == source or target in source.parents):
        raise ValueError(f"{target} holds the curated output {source}: export somewhere else")
    if source is not None and source in target.parents:
        raise ValueError(f"{target} is inside the curated output {source}: export somewhere else")
    spec = recorded_input(str(out_root))
    made_from = input_location(spec) if spec else None
    if made_from is not None and _overlaps(target, made_from):
        raise ValueError(f"{target} overlaps the input {spec} that {out_root} was made from: export somewhere else")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    entries = sorted(p.name for p in target.iterdir()) if target.exists() else []
    foreign = [name for name in entries if not EXPORT_NAMES.match(name)]
    if entries and (foreign or "export.json" not in entries):
        shown = foreign or entries
        raise ValueError(f"{target} is not empty and is not an earlier export (it holds {', '.join(shown[:3])}"
                         f"{', ...' if len(shown) > 3 else ''}{'' if 'export.json' in entries else '; no export.json'}): "
                         f"choose another folder; --overwrite replaces only an earlier export")
    if entries and not overwrite:
        raise ValueError(f"{target} exists and is not empty (an earlier export): choose another folder or pass --overwrite")
    parent = next(p for p in target.parents if p.exists())  # the work folder is made beside the target
    if not parent.is_dir():
        raise ValueError(f"cannot export to {target}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot export to {target}: {parent} is not writable")
    return target


def _join_parts(work: Path, fmt: str, parts: list[str]) -> str:
    """train.csv or annotations.json from the per-partition parts, streamed line by line."""
    name = "train.csv" if fmt == "csv" else "annotations.json"
    with open(work / name, "w", encoding="utf-8", newline="") as out:
        out.write("filepath\ttitle\n" if fmt == "csv" else "[\n")
        first = True
        for part in parts:
            with open(work / "parts" / part, encoding="utf-8", newline="") as piece:
                if fmt == "csv":
                    shutil.copyfileobj(piece, out)  # quoted fields may span lines: copy bytes, not lines
                else:
                    for line in piece:  # one JSON object per line (json.dumps escapes newlines)
                        out.write(("" if first else ",\n") + line.rstrip("\n"))
                        first = False
        if fmt == "json":
            out.write("\n]\n")
    shutil.rmtree(work / "parts")
    return name


def export(spark, out_root: str, fmt: str, to: str, samples_per_shard: int = 10_000,
           overwrite: bool = False, captions: str = "primary", synthetic_share: float | None = None,
           seed: int = 0) -> dict:
    """Write the export to `to` (a local or shared folder every executor can write); returns its summary,
    also written as DIR/export.json."""
    from capfilt.pipelines.output import check_current, read_manifest
    from capfilt.schemas import CURATED

    check_options(fmt, samples_per_shard, captions, synthetic_share)
    synthetic_share = SYNTHETIC_SHARE if synthetic_share is None else synthetic_share
    source = read_manifest(out_root)  # refuses an unfinished OUT
    check_current(out_root, source)  # and one whose stages changed after its curated rows were written
    target = check_target(out_root, to, overwrite)
    work = target.parent / f".{target.name}.inprogress"
    if work.exists():
        shutil.rmtree(work)  # left by a killed export
    work.mkdir(parents=True)
    if fmt != "webdataset":
        (work / "images").mkdir()
        (work / "parts").mkdir()

    curated = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{str(out_root).rstrip('/')}/curated")
    CURATED.validate(curated, where=f"{out_root}/curated")
    rows = curated.count()
    expected = source.get("counts", {}).get("output")
    if expected is not None and rows != expected:
        shutil.rmtree(work)
        raise ValueError(f"{out_root}/curated has {rows} rows but its manifest counts {expected}: not exporting")
    samples, n = _indexed(_samples(curated, captions, synthetic_share, seed), samples_per_shard)
    shards = max(1, math.ceil(n / samples_per_shard))
    # Whole shards per partition (range partitioning never splits one key), in index order.
    samples = samples.repartitionByRange(shards, "shard").sortWithinPartitions("sample_index")
    writer = _shard_writer(str(work)) if fmt == "webdataset" else _files_writer(fmt, str(work), str(target))
    written = (samples.mapInPandas(writer, _Tally.SCHEMA)
               .toPandas().sort_values("file").reset_index(drop=True))  # one small row per file written
    total = int(written.samples.sum())
    if total != n:
        raise RuntimeError(f"exported {total} samples but the export of {out_root} has {n}: nothing was committed")

    summary = {"format": fmt, "source": str(out_root), "source_finished_at": source.get("finished_at"),
               "samples": total}
    synthetic = int(written.synthetic.sum())
    summary["captions"] = {"mode": captions, "rows": rows, "web": total - synthetic, "synthetic": synthetic} | (
        {"synthetic_share": synthetic_share, "seed": seed, "fallbacks": int(written.fallbacks.sum())}
        if captions == "mix" else {}) | ({"rows_left_out": rows - total} if captions in ("web", "synthetic") else {})
    if fmt == "webdataset":
        names = written.file.tolist()
        if names != [f"shard-{i:05d}.tar" for i in range(shards)]:
            raise RuntimeError(f"expected shards 0..{shards - 1}, executors wrote {names}: nothing was committed")
        (work / "shards.txt").write_text("".join(f"{target / name}\n" for name in names))
        pattern = f"shard-{{00000..{shards - 1:05d}}}.tar" if shards > 1 else names[0]
        summary.update(shards=shards, samples_per_shard=samples_per_shard, shard_samples=written.samples.tolist(),
                       train_data=str(target / pattern), train_num_samples=total)
        if "balance_prob" in curated.columns:  # a loader drawing per epoch (keep_in_epoch) sees about this many
            summary["balance_expected_samples_per_epoch"] = round(float(written.balance_prob.sum()), 1)
    else:
        name = _join_parts(work, fmt, written.file.tolist())
        summary.update(file=str(target / name), images=str(target / "images"))
        if fmt == "csv":
            summary["captions_pandas_reads_as_missing"] = int(written.na_like.sum())
    (work / "export.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    import fsspec

    from capfilt.pipelines.output import move_into_place
    move_into_place(fsspec.filesystem("file"), str(work), str(target))
    return summary


def check_options(fmt: str, samples_per_shard: int, captions: str, synthetic_share: float | None) -> None:
    """ValueError for options no export can honour (jobs/export.py asks before Spark starts)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    if samples_per_shard < 1:
        raise ValueError("samples per shard must be at least 1")
    if captions not in CAPTIONS:
        raise ValueError(f"unknown --captions {captions!r}: one of {', '.join(CAPTIONS)}")
    if synthetic_share is not None and captions != "mix":
        raise ValueError(f"--synthetic-share applies to --captions mix only (got --captions {captions})")
    if synthetic_share is not None and not 0.0 <= synthetic_share <= 1.0:
        raise ValueError(f"--synthetic-share must be between 0 and 1 (got {synthetic_share})")
