"""Property: whatever metadata a user hands in, the reader either refuses it in one line before any
fetch, or every row written ends up counted exactly once: to fetch, or a prechecked reject.

Random tables with hostile column names (dots, backticks, spaces, case twins, names the pipeline
uses, unicode), hostile types (ints, floats, nulls, nested values; per row in JSONL) and hostile text
(NUL, newlines, quotes, tabs, very long strings; invalid UTF-8 bytes and broken lines in CSV/JSONL),
written as parquet, csv and jsonl, go through read_pairs + precheck (no network: rows that pass would
be fetched, so they are counted). Derandomized, so CI sees the same examples every run."""
import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capfilt.pipelines.config import DownloadSettings
from capfilt.pipelines.download import precheck, prechecked_rejects, to_fetch
from capfilt.pipelines.inputs import MALFORMED, InputSpec, check_input, read_pairs
from capfilt.schemas import REJECTS, SchemaError

NAMES = ["uid", "status", "key", "Key", "url_2", "Caption", "URL", "a.b", "a`b", "`", "with space", "input_uid",
         "width", "WIDTH", "_malformed", "_reason", "_corrupt_record", "İd", "id", "ß", "SS", "é", "e\u0301",
         "", "jpg", "x" * 300]
SPECIAL = ["\x00", "\n", "\r", '"', "'", "\t", ",", "\\", " ", "\u00a0", "\u200b", "\u2028", "\ufeff", "💥"]
URLS = ["http://h/1.jpg", "HTTP://h/2.jpg", "https://h/3", " http://h/4 ", "http://h/5\x00", "http://h/6\nx",
        "ftp://h/7", "not a url", "", "http://", "http://h/ä"]
text = st.text(st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8")), max_size=12) | st.just("y" * 5000)
scalar = st.none() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.booleans() | text
nested = st.lists(st.integers(-5, 5), max_size=3) | st.fixed_dictionaries({"a": st.integers(0, 9), "b": text})
url = st.sampled_from(URLS) | text | st.none()
caption = text | st.none() | st.sampled_from([" \t\n", "\u3000", "a red circle"])
extra_names = st.lists(st.sampled_from(NAMES) | st.text(max_size=6), max_size=5, unique=True)
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def counted(spark, path: Path, rows_written: int) -> None:
    """The property itself."""
    spec = InputSpec(str(path))
    try:
        check_input(spec)
        marked = precheck(read_pairs(spark, spec), DownloadSettings())
    except SchemaError:
        return  # names the missing or mistyped columns (the url/caption column went missing)
    except ValueError as e:  # refused before any fetch, in one line
        assert "\n" not in str(e), str(e)
        return
    todo, rejects = to_fetch(marked), prechecked_rejects(marked)
    assert not {MALFORMED, "_reason", "_capfilt_corrupt_record"} & set(todo.columns)
    REJECTS.validate(rejects)
    from pyspark.sql import functions as F
    got = dict(marked.groupBy(F.col("_reason").isNull().alias("fetch")).count().collect())
    assert got.get(True, 0) + got.get(False, 0) == rows_written, got


def _columns(data, names, value, dup=False):
    """url, caption and the extra columns (`dup`: a second url column, as a CSV header may have), rows drawn."""
    n = data.draw(st.integers(0, 6), "rows")
    cols = ["url", "caption", *[c for c in names if c not in ("url", "caption")], *(["url"] if dup else [])]
    rows = [[data.draw(url), data.draw(caption), *[data.draw(value) for _ in cols[2:]]] for _ in range(n)]
    return cols, rows


@SETTINGS
@given(data=st.data(), names=extra_names)
def test_parquet_rows_are_counted_or_refused(spark, data, names):
    cols, rows = _columns(data, names, st.none())
    # one type per column (Parquet's rule), drawn per column
    kinds = [pa.string(), pa.string(), *[data.draw(st.sampled_from(
        [pa.int64(), pa.float64(), pa.string(), pa.list_(pa.int64()), pa.struct([("a", pa.int64()), ("b", pa.string())])]))
        for _ in cols[2:]]]
    values = {pa.int64(): st.none() | st.integers(-2**63, 2**63 - 1), pa.float64(): st.none() | st.floats(),
              pa.string(): st.none() | text, pa.list_(pa.int64()): st.none() | st.lists(st.integers(-5, 5), max_size=3)}
    for r in rows:
        for j, kind in enumerate(kinds[2:], 2):
            r[j] = data.draw(values.get(kind, st.none() | st.fixed_dictionaries({"a": st.integers(0, 9), "b": text})))
    table = pa.Table.from_arrays([pa.array([r[j] for r in rows], kind) for j, kind in enumerate(kinds)], names=cols)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, f"{tmp}/m.parquet")
        counted(spark, Path(tmp) / "m.parquet", len(rows))


@SETTINGS
@given(data=st.data(), names=extra_names)
def test_jsonl_rows_are_counted_or_refused(spark, data, names):
    cols, rows = _columns(data, names, scalar | nested)
    lines = []
    for r in rows:
        obj = {c: v for c, v in zip(cols, r) if not (isinstance(v, float) and not math.isfinite(v))}
        line = json.dumps(obj, ensure_ascii=data.draw(st.booleans())).encode()
        broken = data.draw(st.sampled_from([None, "truncated", "bytes"]))
        if broken == "truncated" and len(line) > 2:
            line = line[:data.draw(st.integers(1, len(line) - 1))]
        elif broken == "bytes":
            line = b'{"url": "\xff\xfe' + line
        lines.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        counted(spark, Path(tmp) / "m.jsonl", len(rows))


@SETTINGS
@given(data=st.data(), names=extra_names, dup=st.booleans(), crlf=st.booleans())
def test_csv_rows_are_counted_or_refused(spark, data, names, dup, crlf):
    raw = st.text(st.one_of(st.sampled_from(SPECIAL + ["\udcff", "\udc80"]), st.characters(codec="utf-8")),
                  max_size=12)  # lone surrogates become invalid UTF-8 bytes below
    cols, rows = _columns(data, names, raw | st.none() | st.integers() | st.floats(), dup)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(cols)
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.csv").write_bytes(buf.getvalue().encode("utf-8", "surrogateescape"))
        counted(spark, Path(tmp) / "m.csv", len(rows))  # the rows Python's csv module wrote


def test_the_property_can_fail(spark, tmp_path):
    """The check is not vacuous: a reader that drops a row is caught."""
    (tmp_path / "m.csv").write_text("url,caption\nhttp://h/1,a\n")
    with pytest.raises(AssertionError):
        counted(spark, tmp_path / "m.csv", 2)
