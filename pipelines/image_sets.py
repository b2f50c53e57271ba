"""Image sets a stage reads besides its rows (decontaminate.sets: evaluation sets; target.sets: a target task's
images): a folder of image files, Parquet with image bytes (a `key`/`id` column and an `image` column, or
Hugging Face's image struct), or a folder of WebDataset tars. Checked on the driver before Spark, read by
Spark, and embedded as the pipeline embeds its own rows (the download stage's resizer, then the run's CLIP:
udfs/decontaminate.py EvalEmbedder). Every message names the config key (`key`) the set came from.
"""
from __future__ import annotations

import re
import time

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_ID_COLUMNS = ("key", "__key__", "id", "uid", "eval_id", "image_id")
_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")


def set_name(path: str) -> str:
    """The set's name in every eval_id: its folder or file name, without a .parquet suffix."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"\.(parquet|pq)$", "", name) or "eval"


def set_files(fs, root: str, path: str, key: str) -> tuple[str, list[str]]:
    """(kind, files) of one image set, the files Spark reads: 'parquet' (a Parquet file, or a folder's
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
    raise ValueError(f"{key}: {path} holds no images, Parquet (*.parquet) or WebDataset tars (*.tar)")


def check_sets(paths, key: str) -> None:
    """Each image set can be read, checked on the driver before any work: it exists; every Parquet
    file's footer reads, with an image bytes column, and the set has rows; every tar's index opens, whole,
    with image members."""
    import fsspec
    for path in paths:
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise ValueError(f"{key}: {path} does not exist")
        kind, files = set_files(fs, root, path, key)
        if kind == "parquet":
            if not sum(_check_table(fs, f, key) for f in files):
                raise ValueError(f"{key}: {path} holds no rows")
        elif kind == "tar":
            for f in files:
                _check_tar(fs, f, key)


def _check_table(fs, path: str, key: str) -> int:
    """Rows of one Parquet file of an image set, after checking its footer and image column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"{key}: {path} is not readable Parquet ({_first_line(e)})") from None
    image = next((n for n in schema.names if n.lower() in _IMAGE_COLUMNS), None)
    kind = schema.field(image).type if image else None
    if kind is None or not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
            pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise ValueError(f"{key}: {path} has no image bytes column ({', '.join(_IMAGE_COLUMNS)}: "
                         f"binary, or a struct with bytes); it has {', '.join(schema.names)}")
    return rows


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")


def _check_tar(fs, path: str, key: str) -> None:
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
                    raise ValueError(f"{key}: {path} is truncated (member {cut.name} runs past the end)")
            except tarfile.ReadError:
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tar:  # compressed: read through
                    members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        why = "neither a plain nor a compressed tar" if "could not be opened" in str(e) else _first_line(e)
        raise ValueError(f"{key}: {path} is not a readable tar ({why})") from None
    if not any(m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES) for m in members):
        raise ValueError(f"{key}: {path} holds no images ({len(members)} members, none named "
                         f"{', '.join(IMAGE_SUFFIXES)})")


def set_images(spark, path: str, key: str):
    """(eval_id, image) of one image set; eval_id = '<set name>/<item id>'."""
    import fsspec
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise ValueError(f"{key}: {path} does not exist")
    prefix = F.lit(f"{set_name(path)}/")
    kind, files = set_files(fs, root, path, key)
    if kind == "parquet":
        df = spark.read.option("pathGlobFilter", "*.parquet").parquet(path) if fs.isdir(root) else spark.read.parquet(path)
        names = {c.lower(): c for c in df.columns}
        image = next((names[c] for c in _IMAGE_COLUMNS if c in names), None)
        if image is None:
            raise ValueError(f"{key}: {path} has no image column ({', '.join(_IMAGE_COLUMNS)}); it has "
                             f"{', '.join(df.columns)}")
        kind = df.schema[image].dataType
        if isinstance(kind, T.StructType) and "bytes" in kind.fieldNames():  # Hugging Face datasets' Image
            bytes_col = F.col(f"`{image}`.bytes")
        elif isinstance(kind, T.BinaryType):
            bytes_col = F.col(f"`{image}`")
        else:
            raise ValueError(f"{key}: {path}: column {image} is {kind.simpleString()}, not image bytes")
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


def embed_sets(spark, paths, key: str, clip_settings, folder: str, download) -> dict:
    """Embed every image of the sets into `folder` (eval_id, stored image, sha256, embedding, error) with the
    CLIP of `clip_settings`, each image stored first as `download` stores a row's; returns counts."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from capfilt.pipelines.inference import apply_batches
    from capfilt.udfs.decontaminate import EvalEmbedder
    from capfilt.udfs.models import check_reference
    # The sets' files were checked on the driver before Spark (`check`, by check_models): reading every
    # tar's index again here would double that work on a large set.
    if not paths:
        raise ValueError(f"{key} is empty: name the image sets")
    check_reference(clip_settings.model, "clip")
    items = None
    for path in paths:
        df = set_images(spark, path, key)
        items = df if items is None else items.unionByName(df)
    out_type = T.StructType([T.StructField("eval_id", T.StringType()), T.StructField("stored", T.BinaryType()),
                             T.StructField("sha256", T.StringType()),
                             T.StructField("embedding", T.BinaryType()), T.StructField("error", T.StringType())])
    embedded = apply_batches(items, EvalEmbedder(download, clip_settings), ["eval_id", "image"], out_type,
                             clip_settings.gpus_per_task)
    started = time.time()
    embedded.select("_inference.*").write.mode("overwrite").parquet(folder)
    seconds = round(time.time() - started, 3)
    stored = spark.read.parquet(folder)
    counts = {row["ok"]: row["count"] for row in stored.groupBy(F.col("embedding").isNotNull().alias("ok"))
              .count().collect()}
    duplicated = stored.groupBy("eval_id").count().filter("count > 1").limit(3).collect()
    if duplicated:
        raise ValueError(f"{key}: image ids must be unique, "
                         f"{', '.join(r['eval_id'] for r in duplicated)} repeat (two sets with one folder name?)")
    if not counts.get(True):  # decontaminating against nothing would pass every copy through
        raise ValueError(f"{key}: none of the {counts.get(False, 0)} images decodes as an image "
                         f"({', '.join(map(str, paths))}): nothing to compare against")
    return {"images": counts.get(True, 0), "unreadable": counts.get(False, 0), "embed_seconds": seconds}




def sets_digest(paths) -> str | None:
    """A digest of the sets' files (name, size, modification time), to see a set changed under the same path
    (Stage.inputs). None when a set cannot be listed: the stage's check refuses it with one line."""
    import hashlib
    import json

    import fsspec
    files = []
    try:
        for path in paths:
            fs, root = fsspec.core.url_to_fs(path)
            for name in sorted(fs.find(root)) if fs.isdir(root) else [root]:
                info = fs.info(name)
                files.append([name, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    except OSError:
        return None
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()
