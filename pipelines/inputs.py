"""Reading LAION-style metadata (parquet, csv or jsonl; a file, a folder or a glob) into `pairs` records.

Column mapping turns the input's own names into url / caption / uid; every other column is kept.
`uid` is the id column's value when one is given, else a hash of url and caption (stable across
reruns and partitionings; identical url+caption rows share a uid and are caught as duplicates).
Captions with invalid UTF-8 are repaired (bad bytes become U+FFFD) so no Python worker trips on them.
"""
from __future__ import annotations

from dataclasses import dataclass

from schemas import CONTRACTS, SchemaError

PRESETS = {
    # LAION-400M/5B parquet: URL, TEXT, SAMPLE_ID, WIDTH, HEIGHT, similarity, punsafe, pwatermark...
    "laion": {"url_col": "URL", "caption_col": "TEXT", "id_col": "SAMPLE_ID"},
    "default": {"url_col": "url", "caption_col": "caption", "id_col": None},
}
FORMATS = ("parquet", "csv", "jsonl")
# Names that stages produce (ours, and img2dataset's status columns). An input column with one of these
# names (in any case: Spark resolves names case-insensitively) is kept as input_<name>.
RESERVED = {n.lower() for c in CONTRACTS.values() for n in c.names} | {
    "key", "status", "error_message", "exif", "jpg", "png", "webp", "txt"}


@dataclass(frozen=True)
class InputSpec:
    path: str
    format: str = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    id_col: str | None = None

    @classmethod
    def from_preset(cls, path: str, preset: str = "default", **overrides) -> "InputSpec":
        if preset not in PRESETS:
            raise ValueError(f"unknown input preset {preset!r} (known: {', '.join(PRESETS)})")
        cols = dict(PRESETS[preset])
        cols.update({k: v for k, v in overrides.items() if v is not None})
        return cls(path=path, **cols)


def detect_format(path: str) -> str:
    lowered = path.lower().rstrip("/")
    for fmt, suffixes in (("parquet", (".parquet", ".pq")), ("csv", (".csv", ".csv.gz")),
                          ("jsonl", (".jsonl", ".json", ".jsonl.gz", ".json.gz"))):
        if lowered.endswith(suffixes):
            return fmt
    import fsspec
    fs, root = fsspec.core.url_to_fs(path)
    names = fs.glob(root) if any(c in root for c in "*?[") else (fs.find(root) if fs.isdir(root) else [root])
    for fmt in FORMATS:
        if any(detect_format(n) == fmt for n in names if not n.rsplit("/", 1)[-1].startswith(("_", "."))):
            return fmt
    raise ValueError(f"cannot tell the format of {path}: no .parquet, .csv or .jsonl files there; "
                     f"pass --input-format")


def read_raw(spark, spec: InputSpec):
    fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r} (known: {', '.join(FORMATS)})")
    reader = spark.read
    if fmt == "parquet":
        return reader.option("pathGlobFilter", "*.parquet").parquet(spec.path) if not spec.path.endswith(
            (".parquet", ".pq")) else reader.parquet(spec.path)
    if fmt == "csv":
        return reader.option("header", True).option("multiLine", True).option("escape", '"').csv(spec.path)
    return reader.json(spec.path)


def read_pairs(spark, spec: InputSpec):
    """Input metadata as `pairs` records (uid, url, caption) plus the input's other columns."""
    from pyspark.sql import functions as F

    raw = read_raw(spark, spec)
    wanted = [("url", spec.url_col), ("caption", spec.caption_col)] + ([("uid", spec.id_col)] if spec.id_col else [])
    missing = [f"no column '{col}' for {role} (pass --{role if role != 'uid' else 'id'}-col)"
               for role, col in wanted if col not in raw.columns]
    if missing:
        raise SchemaError("pairs", missing + [f"the input's columns are: {', '.join(raw.columns)}"], spec.path)

    mapped = {spec.url_col, spec.caption_col} | ({spec.id_col} if spec.id_col else set())
    extras = [F.col(f"`{c}`").alias(f"input_{c}" if c.lower() in RESERVED else c)
              for c in raw.columns if c not in mapped]
    url = F.trim(F.col(f"`{spec.url_col}`").cast("string"))
    caption = F.make_valid_utf8(F.col(f"`{spec.caption_col}`").cast("string"))
    if spec.id_col:
        uid = F.col(f"`{spec.id_col}`").cast("string")
        uid = F.when(uid.isNull() | (F.trim(uid) == ""), F.concat(F.lit("h"), _hash_uid(url, caption))).otherwise(uid)
    else:
        uid = F.concat(F.lit("h"), _hash_uid(url, caption))
    return raw.select(uid.alias("uid"), url.alias("url"), caption.alias("caption"), *extras)


def _hash_uid(url, caption):
    from pyspark.sql import functions as F
    return F.substring(F.sha2(F.concat_ws("\u0000", F.coalesce(url, F.lit("")), F.coalesce(caption, F.lit(""))), 256), 1, 20)
