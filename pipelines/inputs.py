"""Reading LAION-style metadata (parquet, csv or jsonl; a file, a folder or a glob) into `pairs` records.

Column mapping turns the input's own names into url / caption / uid; every other column is kept.
`uid` is the id column's value when one is given, else a hash of url and caption (stable across
reruns and partitionings; identical url+caption rows share a uid and are caught as duplicates).
Captions with invalid UTF-8 are repaired (bad bytes become U+FFFD) so no Python worker trips on them.

Hostile input: `check_input` refuses, with one line and before any Spark job, what cannot be read at
all (no such path, an empty or non-Parquet .parquet file, a folder without data files). A folder of
several formats is read whole (union by column name). Rows the reader cannot parse (a broken JSON
line, a CSV row with more or fewer fields than its header, lines folded by an unterminated quote) are
kept and marked in the MALFORMED column, which the download precheck turns into a `malformed_row`
reject. Any column name is carried (dots, backticks, spaces...); names that clash, also only by case
(Spark compares names case-insensitively), are renamed: input_<name> for names the pipeline
produces, then <name>_2, _3... in column order.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from capfilt.schemas import CONTRACTS, SchemaError

PRESETS = {
    # LAION-400M/5B parquet: URL, TEXT, SAMPLE_ID, WIDTH, HEIGHT, similarity, punsafe, pwatermark...
    "laion": {"url_col": "URL", "caption_col": "TEXT", "id_col": "SAMPLE_ID"},
    "default": {"url_col": "url", "caption_col": "caption", "id_col": None},
}
FORMATS = ("parquet", "csv", "jsonl")
SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz"),
            "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz")}
# Set on a row the reader could not parse (the raw text, shortened): precheck rejects it as malformed_row.
MALFORMED = "_malformed"
_CORRUPT = "_capfilt_corrupt_record"  # Spark's corrupt-record column, consumed into MALFORMED
_HEADER_LIMIT = 1 << 20  # a CSV header longer than this is an unterminated quote, not a header


def _fold_keys(name: str) -> set[str]:
    """The keys under which Spark may take two names for the same column: it compares with a full
    lower-casing in some places and a per-character case fold (Java's equalsIgnoreCase) in others."""
    def simple(c):  # Java's one-character case mapping: multi-character mappings (ß -> SS) do not apply
        u = c.upper() if len(c.upper()) == 1 else c
        return u.lower() if len(u.lower()) == 1 else u
    return {name.lower(), "".join(map(simple, name))}


# Names that stages produce (ours, img2dataset's status columns and internal markers). An input column
# with one of these names, in any case, is kept as input_<name>.
RESERVED = {n.lower() for c in CONTRACTS.values() for n in c.names} | {
    "key", "status", "error_message", "exif", "jpg", "png", "webp", "txt", "md5", "sha512",
    "_reason", MALFORMED,
    # the download stage's politeness columns (pipelines/download.py: with_hosts, plan_shards)
    "_host", "_authority", "_limited", "_count", "_start", "_pos", "_shard", "_turn", "_mix"}
_RESERVED_KEYS = set().union(*map(_fold_keys, RESERVED))


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


def _format_of(name: str) -> str | None:
    lowered = name.lower().rstrip("/")
    return next((fmt for fmt, suffixes in SUFFIXES.items() if lowered.endswith(suffixes)), None)


def input_files(spec: InputSpec) -> dict[str, list[str]]:
    """{format: [file, ...]} of the data files that `spec.path` names (a file, a folder, a glob).
    Files and folders whose name starts with _ or . (Spark's and img2dataset's sidecars) are skipped.
    With an explicit format, a folder's files of that format are read, or all its files if none has
    that format's suffix. Raises ValueError (one line) when there is nothing to read."""
    import fsspec

    if spec.format not in ("auto", *FORMATS):
        raise ValueError(f"unknown input format {spec.format!r} (known: {', '.join(FORMATS)})")
    fs, root = fsspec.core.url_to_fs(spec.path)
    proto = spec.path.split("://", 1)[0] + "://" if "://" in spec.path else ""
    if any(c in root for c in "*?["):
        names = [n for n in fs.glob(root) if fs.isfile(n) and not n.rsplit("/", 1)[-1].startswith(("_", "."))]
        if not names:
            raise ValueError(f"input {spec.path}: the glob matches no file")
    elif fs.isdir(root):
        base = root.rstrip("/") + "/"
        names = [n for n in fs.find(root)
                 if not any(p.startswith(("_", ".")) for p in n[len(base):].split("/"))]
    elif fs.isfile(root):
        fmt = spec.format if spec.format != "auto" else _format_of(root)
        if fmt is None:
            raise ValueError(f"cannot tell the format of {spec.path} from its name: pass --input-format")
        return {fmt: [proto + root]}
    else:
        raise ValueError(f"input {spec.path} does not exist")
    by_format: dict[str, list[str]] = {}
    for n in sorted(names):
        if _format_of(n):
            by_format.setdefault(_format_of(n), []).append(proto + n)
    if spec.format != "auto" and names:
        return {spec.format: by_format.get(spec.format) or [proto + n for n in sorted(names)]}
    if not by_format:
        raise ValueError(f"no .parquet, .csv or .jsonl files in {spec.path}" + (
            "; pass --input-format" if names else ""))
    return by_format


def detect_format(path: str) -> str:
    """The one format of the data files at `path` ('mixed' when a folder or glob holds several)."""
    found = input_files(InputSpec(path))
    return next(iter(found)) if len(found) == 1 else "mixed"


def check_input(spec: InputSpec) -> None:
    """Refuse, with one line and without Spark, an input that cannot be read: a missing path or a glob
    that matches nothing, a folder without data files, an empty or non-Parquet .parquet file, a Parquet
    schema whose names clash (Spark reads names case-insensitively), a CSV without a readable header."""
    import fsspec
    import pyarrow.parquet as pq

    for fmt, files in input_files(spec).items():
        for f in files:
            fs, p = fsspec.core.url_to_fs(f)
            if fmt == "parquet":
                if fs.size(p) == 0:
                    raise ValueError(f"input {f} is empty (0 bytes), not a Parquet file")
                try:
                    with fs.open(p, "rb") as fh:
                        schema = pq.read_schema(fh)
                except Exception as e:  # pyarrow says ArrowInvalid / OSError: the one line is ours
                    raise ValueError(f"input {f} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
                _check_parquet_names(f, schema)
            elif fmt == "csv":
                _csv_header(f)


def _check_parquet_names(where: str, schema) -> None:
    import pyarrow as pa

    def walk(fields, prefix):
        seen = {}
        for fld in fields:
            for k in _fold_keys(fld.name):
                if k in seen:
                    raise ValueError(f"input {where}: columns {prefix}{seen[k]!r} and {prefix}{fld.name!r} differ "
                                     f"only by case; Spark cannot tell them apart: rename one")
                seen[k] = fld.name
            t = fld.type
            while pa.types.is_list(t) or pa.types.is_large_list(t):
                t = t.value_type
            if pa.types.is_struct(t):
                walk([t.field(i) for i in range(t.num_fields)], f"{prefix}{fld.name}.")
    walk(list(schema), "")


def _csv_header(path: str) -> list[str] | None:
    """The header of a CSV file, parsed with Python's csv module (None for an empty file)."""
    import fsspec
    with fsspec.open(path, "rb", compression="infer") as f:
        head = f.read(_HEADER_LIMIT)
    text = head.decode("utf-8-sig", errors="replace")
    if not text.strip():
        return None
    buf = io.StringIO(text, newline="")
    header = next(csv.reader(buf))
    if len(head) == _HEADER_LIMIT and buf.tell() >= len(text):
        raise ValueError(f"input {path}: the CSV header does not end within 1 MiB (an unterminated quote?)")
    if any(c in name for name in header for c in "\r\n"):
        raise ValueError(f"input {path}: a CSV header name spans lines; Spark's CSV reader cannot read that file")
    return header


def _read_parts(spark, spec: InputSpec):
    """[(DataFrame with columns _c0.._cN (and _CORRUPT), the input's column names, format)], one per
    format (and per CSV header): positional names, so that no input name is ever parsed or resolved."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import types as T

    parts = []
    for fmt, files in input_files(spec).items():
        try:
            if fmt == "csv":
                by_header: dict[tuple, list[str]] = {}
                for f in files:
                    header = _csv_header(f)
                    if header is not None:  # an empty file has no rows
                        by_header.setdefault(tuple(header), []).append(f)
                for header, group in by_header.items():
                    schema = T.StructType([T.StructField(f"_c{i}", T.StringType()) for i in range(len(header))]
                                          + [T.StructField(_CORRUPT, T.StringType())])
                    df = (spark.read.schema(schema).option("header", True).option("enforceSchema", True)
                          .option("multiLine", True).option("escape", '"').option("mode", "PERMISSIVE")
                          .option("columnNameOfCorruptRecord", _CORRUPT).csv(group))
                    parts.append((df, list(header), fmt))
                continue
            if fmt == "parquet":
                raw = spark.read.option("mergeSchema", True).parquet(*files)
            else:
                raw = (spark.read.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", _CORRUPT)
                       .json(files))
        except AnalysisException as e:  # clashing names, unmergeable schemas: Spark's message, one line
            raise ValueError(f"cannot read {spec.path} as {fmt}: {str(e).splitlines()[0]}") from None
        names = [c for c in raw.columns if c != _CORRUPT]
        df = raw.toDF(*[c if c == _CORRUPT else f"_c{names.index(c)}" for c in raw.columns])
        parts.append((df, names, fmt))
    return parts


def _output_names(names: list[str], spec: InputSpec, where: str) -> dict[int, str]:
    """{input column index: its name in `pairs`} for every column; mapped columns become uid/url/caption."""
    wanted = [("url", spec.url_col), ("caption", spec.caption_col)] + ([("uid", spec.id_col)] if spec.id_col else [])
    missing = [f"no column '{col}' for {role} (pass --{role if role != 'uid' else 'id'}-col)"
               for role, col in wanted if col not in names]
    if missing:
        raise SchemaError("pairs", missing + [f"the input's columns are: {', '.join(names)}"], where)
    out = {names.index(col): role for role, col in wanted}
    claimed = set().union(*map(_fold_keys, ("uid", "url", "caption")))

    def claim(i, name):
        out[i] = name
        claimed.update(_fold_keys(name))
    desired = {i: f"input_{n}" if _fold_keys(n) & _RESERVED_KEYS else n for i, n in enumerate(names) if i not in out}
    # A name the input already has takes precedence over an input_<name> made here; what is left
    # gets the first free suffix, in column order.
    for renamed in (False, True):
        for i, name in desired.items():
            if i not in out and (name != names[i]) == renamed and not _fold_keys(name) & claimed:
                claim(i, name)
    for i, name in desired.items():
        n = 2
        while i not in out:
            if not _fold_keys(f"{name}_{n}") & claimed:
                claim(i, f"{name}_{n}")
            n += 1
    return out


def _malformed(df, names: list[str], fmt: str, url_index: int):
    """Why a row could not be parsed (with its raw text, shortened), else null."""
    from pyspark.sql import functions as F

    if _CORRUPT not in df.columns:
        return F.lit(None).cast("string")
    raw = F.substring(F.col(_CORRUPT), 1, 200)
    if fmt != "csv":
        return F.when(F.col(_CORRUPT).isNotNull(), F.concat(F.lit("unparseable line: "), raw))
    # An unterminated quote makes the parser read on to the next quote: the rows in between fold into one
    # field. Visible as a field that spans lines, one of which looks like a whole row: as many fields as
    # the header, a URL where the url column is. (A fold that ends in valid CSV again is valid CSV; no
    # parser can tell it from a real multi-line field without such rows in it: see docs/download.md.)
    def folded(c):
        lines = F.split(c, r"\r\n|\r|\n")
        return (F.size(lines) > 1) & F.exists(F.slice(lines, 2, 1 << 30), lambda line: (
            F.size(F.split(line, ",", -1)) >= len(names))
            & F.coalesce(F.get(F.split(line, ",", -1), url_index).rlike(r'(?i)^\s*"?https?://'), F.lit(False)))
    fold = [F.when(folded(F.col(f"_c{i}")), F.concat(
        F.lit(f"field '{n}' holds lines that look like rows folded by an unterminated quote: "),
        F.substring(F.col(f"_c{i}"), 1, 200))) for i, n in enumerate(names)]
    return F.coalesce(
        F.when(F.col(_CORRUPT).isNotNull(),
               F.concat(F.lit(f"not {len(names)} fields as in the header: "), raw)), *fold)


def read_pairs(spark, spec: InputSpec):
    """Input metadata as `pairs` records (uid, url, caption), the input's other columns, and MALFORMED."""
    from functools import reduce

    from pyspark.sql import functions as F

    parts = []
    for df, names, fmt in _read_parts(spark, spec):
        out = _output_names(names, spec, spec.path)
        col = {role: F.col(f"_c{i}") for i, role in out.items() if role in ("uid", "url", "caption")}
        # Every whitespace (not only spaces) around a URL; the scheme in lower case (schemes are
        # case-insensitive; downstream checks and dedup compare text).
        url = F.regexp_replace(col["url"].cast("string"), r"(?U)^\s+|\s+\z", "")
        url = F.regexp_replace(F.regexp_replace(url, r"^(?i)https://", "https://"), r"^(?i)http://", "http://")
        caption = F.make_valid_utf8(col["caption"].cast("string"))
        uid = F.concat(F.lit("h"), _hash_uid(url, caption))
        if spec.id_col:
            given = col["uid"].cast("string")
            uid = F.when(given.isNull() | (F.trim(given) == ""), uid).otherwise(given)
        extras = [F.col(f"_c{i}").alias(name) for i, name in sorted(out.items())
                  if name not in ("uid", "url", "caption")]
        parts.append(df.select(uid.alias("uid"), url.alias("url"), caption.alias("caption"), *extras,
                               _malformed(df, names, fmt, names.index(spec.url_col)).alias(MALFORMED)))
    if not parts:
        raise ValueError(f"input {spec.path} has no rows: every file is empty")
    return reduce(_union, parts)


def _union(a, b):
    """Union by name; a column whose type differs between the parts (parquet int, csv string...)
    becomes a string (JSON text for nested values), so the union cannot fail at run time."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    ta = {f.name.lower(): f.dataType.simpleString() for f in a.schema.fields}
    tb = {f.name.lower(): f.dataType.simpleString() for f in b.schema.fields}
    differ = {n for n in ta.keys() & tb.keys() if ta[n] != tb[n]}

    def as_string(df):
        def col(f):
            c = F.col("`" + f.name.replace("`", "``") + "`")
            if f.name.lower() not in differ:
                return c
            nested = isinstance(f.dataType, (T.StructType, T.ArrayType, T.MapType))
            return (F.to_json(c) if nested else c.cast("string")).alias(f.name)
        return df.select(*[col(f) for f in df.schema.fields])
    return as_string(a).unionByName(as_string(b), allowMissingColumns=True)


def _hash_uid(url, caption):
    from pyspark.sql import functions as F
    return F.substring(F.sha2(F.concat_ws("\u0000", F.coalesce(url, F.lit("")), F.coalesce(caption, F.lit(""))), 256), 1, 20)
