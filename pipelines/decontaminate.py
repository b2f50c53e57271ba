"""The decontaminate stage: scored -> scored (+ rejects). Copies of evaluation images leave the data.

`decontaminate.sets` names evaluation image sets, each a folder of image files, Parquet with image bytes
(a `key`/`id` column and an `image` column, or Hugging Face's image struct), or a folder of WebDataset
tars. Every evaluation image is embedded as the pipeline embeds its own rows (the download stage's
resizer, then the run's CLIP: udfs/decontaminate.py). A row leaves as `eval_contaminated` when its
sha256 equals an evaluation file's (an exact copy), or when its stored image embedding lies within
`decontaminate.threshold` (cosine) of an evaluation image's (faiss, exact inner-product search) and the
pixels confirm it (udfs/decontaminate.py: copy_residual; `decontaminate.verify`). The detail names the
evaluation item (`<set>/<id>`) and the evidence. DataComp removes near-duplicates of its
evaluation sets the same way (datacomp#70).
"""
from __future__ import annotations

import pandas as pd  # module level: Spark reads the pandas UDFs' type hints from these globals

import re
import time

from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import SCORED

STAGE = "decontaminate"
EVAL_CONTAMINATED = "eval_contaminated"
REASONS = {EVAL_CONTAMINATED: "a copy of an evaluation image (detail: the evaluation item, and identical bytes "
                              "or the embedding cosine)"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_ID_COLUMNS = ("key", "__key__", "id", "uid", "eval_id", "image_id")
_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")


def set_name(path: str) -> str:
    """The set's name in every eval_id: its folder or file name, without a .parquet suffix."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"\.(parquet|pq)$", "", name) or "eval"


def check(cfg, input_root: str | None = None) -> None:
    """On the driver, before Spark: the rows' embeddings come from this run's CLIP, that CLIP loads, and
    every evaluation set can be read (a curate run reaches this stage after download, caption and filter)."""
    from capfilt.pipelines.heads import clip_of_input
    from capfilt.udfs.models import check_reference
    if not cfg.decontaminate.sets:
        raise ValueError("decontaminate.sets is empty: name the evaluation sets to decontaminate against")
    same_clip(clip_of_input(input_root) if input_root else None, cfg)
    check_reference(cfg.filter.model, "clip")
    check_eval_sets(cfg.decontaminate.sets)


def same_clip(clip: str | None, cfg) -> None:
    from capfilt.udfs.heads import same_reference
    if clip is not None and not same_reference(clip, cfg.filter.model):
        raise ValueError(f"the stored embeddings come from {clip} (the filter stage's CLIP), this run's filter.model "
                         f"is {cfg.filter.model}: evaluation images must be embedded by the same model")


def set_files(fs, root: str, path: str) -> tuple[str, list[str]]:
    """(kind, files) of one evaluation set, the files Spark reads: 'parquet' (a Parquet file, or a folder's
    *.parquet), 'tar' (WebDataset tars) or 'images' (image files). Names starting with . or _ are left out
    below a folder, as Spark leaves them out."""
    if fs.isfile(root):
        files = [root]
    else:
        base = root.rstrip("/")
        files = [f for f in sorted(fs.find(base)) if not any(
            p.startswith((".", "_")) for p in f[len(base):].strip("/").split("/"))]
    tables = [f for f in files if f.endswith(".parquet") or f == root and f.endswith(".pq")]
    if tables:
        return "parquet", tables
    tars = [f for f in files if f.endswith(".tar")]
    if tars:
        return "tar", tars
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        return "images", images
    raise ValueError(f"decontaminate.sets: {path} holds no images, Parquet (*.parquet) or WebDataset tars (*.tar)")


def check_eval_sets(paths) -> None:
    """Each evaluation set can be read, checked on the driver before any work: it exists; every Parquet
    file's footer reads, with an image bytes column, and the set has rows; every tar's index opens, whole,
    with image members."""
    import fsspec
    for path in paths:
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise ValueError(f"decontaminate.sets: {path} does not exist")
        kind, files = set_files(fs, root, path)
        if kind == "parquet":
            if not sum(_check_table(fs, f) for f in files):
                raise ValueError(f"decontaminate.sets: {path} holds no rows")
        elif kind == "tar":
            for f in files:
                _check_tar(fs, f)


def _check_table(fs, path: str) -> int:
    """Rows of one Parquet file of an evaluation set, after checking its footer and image column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"decontaminate.sets: {path} is not readable Parquet ({_first_line(e)})") from None
    image = next((n for n in schema.names if n.lower() in _IMAGE_COLUMNS), None)
    kind = schema.field(image).type if image else None
    if kind is None or not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
            pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise ValueError(f"decontaminate.sets: {path} has no image bytes column ({', '.join(_IMAGE_COLUMNS)}: "
                         f"binary, or a struct with bytes); it has {', '.join(schema.names)}")
    return rows


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")


def _check_tar(fs, path: str) -> None:
    """A tar's index: it opens (plain or compressed), no member runs past the end of the file, and it
    holds image members (what the workers read)."""
    import tarfile
    try:
        with fs.open(path, "rb") as f:
            size = fs.size(path)
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:  # plain: the index is read by seeking
                    members = tar.getmembers()
                cut = next((m for m in members if m.offset_data + m.size > size), None)
                if cut is not None:
                    raise ValueError(f"decontaminate.sets: {path} is truncated (member {cut.name} runs past the end)")
            except tarfile.ReadError:
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tar:  # compressed: read through
                    members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        why = "neither a plain nor a compressed tar" if "could not be opened" in str(e) else _first_line(e)
        raise ValueError(f"decontaminate.sets: {path} is not a readable tar ({why})") from None
    if not any(m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES) for m in members):
        raise ValueError(f"decontaminate.sets: {path} holds no images ({len(members)} members, none named "
                         f"{', '.join(IMAGE_SUFFIXES)})")


def eval_images(spark, path: str):
    """(eval_id, image) of one evaluation set; eval_id = '<set name>/<item id>'."""
    import fsspec
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise ValueError(f"decontaminate.sets: {path} does not exist")
    prefix = F.lit(f"{set_name(path)}/")
    kind, files = set_files(fs, root, path)
    if kind == "parquet":
        df = spark.read.option("pathGlobFilter", "*.parquet").parquet(path) if fs.isdir(root) else spark.read.parquet(path)
        names = {c.lower(): c for c in df.columns}
        image = next((names[c] for c in _IMAGE_COLUMNS if c in names), None)
        if image is None:
            raise ValueError(f"decontaminate.sets: {path} has no image column ({', '.join(_IMAGE_COLUMNS)}); it has "
                             f"{', '.join(df.columns)}")
        kind = df.schema[image].dataType
        if isinstance(kind, T.StructType) and "bytes" in kind.fieldNames():  # Hugging Face datasets' Image
            bytes_col = F.col(f"`{image}`.bytes")
        elif isinstance(kind, T.BinaryType):
            bytes_col = F.col(f"`{image}`")
        else:
            raise ValueError(f"decontaminate.sets: {path}: column {image} is {kind.simpleString()}, not image bytes")
        key = next((names[c] for c in _ID_COLUMNS if c in names), None)
        ids = F.col(f"`{key}`").cast("string") if key else F.sha2(bytes_col, 256)
        return df.select(F.concat(prefix, ids).alias("eval_id"), bytes_col.alias("image"))
    if kind == "tar":
        proto = path.split("://")[0] + "://" if "://" in path else ""
        listing = spark.createDataFrame([(f"{proto}{t}",) for t in files], "tar string").repartition(
            min(len(files), spark.sparkContext.defaultParallelism))
        schema = T.StructType([T.StructField("eval_id", T.StringType()), T.StructField("image", T.BinaryType())])
        return listing.mapInPandas(_TarImages(f"{set_name(path)}/"), schema)
    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(path)
    df = df.filter(F.lower("path").rlike(r"\.(" + "|".join(s[1:] for s in IMAGE_SUFFIXES) + r")$"))
    relative = F.regexp_replace("path", "^.*?" + re.escape(root) + "/", "")
    return df.select(F.concat(prefix, F.regexp_replace(relative, r"\.[^./]*$", "")).alias("eval_id"),
                     F.col("content").alias("image"))


class _TarImages:
    """mapInPandas: tar paths -> (eval_id, image) of every image member (WebDataset: key = name up to
    the first dot of its base name)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, frames):
        import tarfile

        import fsspec
        import pandas as pd
        for frame in frames:
            for path in frame["tar"]:
                ids, blobs = [], []
                with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        name = member.name
                        if not member.isfile() or not name.lower().endswith(IMAGE_SUFFIXES):
                            continue
                        folder, _, base = name.rpartition("/")
                        key = f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]
                        ids.append(self.prefix + key)
                        blobs.append(tar.extractfile(member).read())
                yield pd.DataFrame({"eval_id": ids, "image": blobs})


def stored_settings(chain, cfg):
    """The download settings the rows' images were stored with (the download manifest's), so that an
    evaluation image is resized as its copy in the data was."""
    import dataclasses

    from capfilt.pipelines.config import DownloadSettings, build
    from capfilt.pipelines.output import read_manifest
    recorded = read_manifest(chain.images).get("config", {}).get("download")
    if not isinstance(recorded, dict):
        return cfg.download
    known = {f.name for f in dataclasses.fields(DownloadSettings)}
    return build(DownloadSettings, {k: v for k, v in recorded.items() if k in known}, "download")


def embed_eval_sets(spark, cfg, folder: str, download) -> dict:
    """Embed every evaluation set into `folder` (eval_id, stored image, sha256, embedding, error); returns
    counts."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from capfilt.pipelines.inference import apply_batches
    from capfilt.udfs.decontaminate import EvalEmbedder
    from capfilt.udfs.models import check_reference
    # The sets' files were checked on the driver before Spark (`check`, by check_models): reading every
    # tar's index again here would double that work on a large set.
    if not cfg.decontaminate.sets:
        raise ValueError("decontaminate.sets is empty: name the evaluation sets to decontaminate against")
    check_reference(cfg.filter.model, "clip")
    items = None
    for path in cfg.decontaminate.sets:
        df = eval_images(spark, path)
        items = df if items is None else items.unionByName(df)
    out_type = T.StructType([T.StructField("eval_id", T.StringType()), T.StructField("stored", T.BinaryType()),
                             T.StructField("sha256", T.StringType()),
                             T.StructField("embedding", T.BinaryType()), T.StructField("error", T.StringType())])
    embedded = apply_batches(items, EvalEmbedder(download, cfg.filter), ["eval_id", "image"], out_type,
                             cfg.filter.gpus_per_task)
    started = time.time()
    embedded.select("_inference.*").write.mode("overwrite").parquet(folder)
    seconds = round(time.time() - started, 3)
    stored = spark.read.parquet(folder)
    counts = {row["ok"]: row["count"] for row in stored.groupBy(F.col("embedding").isNotNull().alias("ok"))
              .count().collect()}
    duplicated = stored.groupBy("eval_id").count().filter("count > 1").limit(3).collect()
    if duplicated:
        raise ValueError(f"decontaminate.sets: evaluation ids must be unique, "
                         f"{', '.join(r['eval_id'] for r in duplicated)} repeat (two sets with one folder name?)")
    if not counts.get(True):  # decontaminating against nothing would pass every copy through
        raise ValueError(f"decontaminate.sets: none of the {counts.get(False, 0)} evaluation images decodes as an "
                         f"image ({', '.join(map(str, cfg.decontaminate.sets))}): nothing to decontaminate against")
    return {"images": counts.get(True, 0), "unreadable": counts.get(False, 0), "embed_seconds": seconds}


def split(rows, cfg, context) -> Result:
    from pyspark.sql import functions as F

    from capfilt.pipelines.heads import clip_of
    same_clip(clip_of(context.chain), cfg)
    spark = rows.sparkSession
    folder = f"{context.workdir}/eval"
    report = {"eval_sets": {"sets": list(cfg.decontaminate.sets), "threshold": cfg.decontaminate.threshold,
                            "clip": cfg.filter.model,
                            **embed_eval_sets(spark, cfg, folder, stored_settings(context.chain, cfg))}}
    print(f"[{STAGE}] evaluation images: {report['eval_sets']['images']} embedded, "
          f"{report['eval_sets']['unreadable']} unreadable", flush=True)
    hashes = F.broadcast(spark.read.parquet(folder).select(F.col("sha256").alias("_eval_sha"),
                                                           F.col("eval_id").alias("_exact")).dropDuplicates(["_eval_sha"]))
    settings = cfg.decontaminate

    def nearest(embeddings: pd.Series) -> pd.DataFrame:
        from capfilt.udfs.decontaminate import nearest_eval
        ids, cosines = nearest_eval(embeddings.tolist(), folder, settings.candidates, settings.threshold)
        return pd.DataFrame({"ids": ids, "cosines": cosines})
    found = F.pandas_udf(nearest, "ids array<string>, cosines array<float>")
    marked = (rows.join(hashes, rows["sha256"] == hashes["_eval_sha"], "left").drop("_eval_sha")
              .withColumn("_near", found("image_embedding")).localCheckpoint())
    if settings.verify == "pixels":
        def confirm(images: pd.Series, candidates: pd.Series) -> pd.DataFrame:
            from capfilt.udfs.decontaminate import confirm_copies
            ids, residuals = confirm_copies(images.tolist(), [list(c) if c is not None else [] for c in candidates],
                                            folder, settings.pixel_tolerance)
            return pd.DataFrame({"eval_id": ids, "residual": residuals})
        confirmed = F.pandas_udf(confirm, "eval_id string, residual float")
        # Image bytes are read from the download, for the rows with a candidate only.
        images = context.images()
        candidates = marked.filter(F.col("_exact").isNull() & (F.size("_near.ids") > 0)).select("uid", "_near")
        checked = (candidates.join(images.select("uid", "image"), "uid")
                   .select("uid", confirmed("image", "_near.ids").alias("_copy")).localCheckpoint())
        marked = marked.join(checked, "uid", "left")
        copy_of = F.col("_copy.eval_id")
        how = F.concat(F.lit(": pixels within "), F.format_number("_copy.residual", 1), F.lit(" of it, cosine "),
                       F.format_number(F.element_at("_near.cosines", F.array_position("_near.ids", copy_of).cast("int")), 4))
    else:
        copy_of = F.element_at("_near.ids", 1)
        how = F.concat(F.lit(": cosine "), F.format_number(F.element_at("_near.cosines", 1), 4))
    hit = F.col("_exact").isNotNull() | copy_of.isNotNull()
    detail = F.when(F.col("_exact").isNotNull(), F.concat(F.lit("eval item "), "_exact", F.lit(": identical bytes (sha256)"))) \
        .otherwise(F.concat(F.lit("eval item "), copy_of, how))
    kept = marked.filter(~hit).select(*rows.columns)
    return Result(kept, reject_rows(marked.filter(hit), STAGE, EVAL_CONTAMINATED, detail), report)


DEFINITION = Stage(name=STAGE, reads=SCORED, adds=(), reasons=REASONS, split=split, check=check, images=True,
                   help="drop copies of evaluation images (decontaminate.sets)",
                   # the evaluation images are stored as the rows' were
                   depends=("download.image_size", "download.resize_mode", "download.resize_only_if_bigger",
                            "download.encode_format", "download.encode_quality"),
                   enabled=lambda cfg: bool(cfg.decontaminate.sets),
                   models=lambda cfg: {"clip": cfg.filter.model})
