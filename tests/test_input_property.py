"""Property: whatever metadata a user hands in, the reader either refuses it in one line before any
fetch, or every row written ends up counted exactly once: to fetch, or a prechecked reject.

Random tables with hostile column names (dots, backticks, spaces, case twins, names the pipeline
uses, unicode), hostile types (ints, floats, nulls, nested values; per row in JSONL) and hostile text
(NUL, newlines, quotes, tabs, very long strings; invalid UTF-8 bytes and broken lines in CSV/JSONL),
written as parquet, csv and jsonl, go through read_pairs + precheck (no network: rows that pass would
be fetched, so they are counted). Derandomized, so CI sees the same examples every run.

What servers send is input too: robots.txt bodies (any bytes parse; a Disallow survives every encoding,
line end and whitespace; verdicts do not depend on BOM, line ends or UTF-16/32) and Retry-After values
(never raise; None or a finite wait; ASCII digits exactly; other digits ignored; dates to seconds left)."""
import codecs
import csv
import datetime
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- robots.txt bodies and Retry-After values: what a server sends is input too (no Spark) -----------

CHEAP = settings(max_examples=300, deadline=None, derandomize=True, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow])
TOKENS = ("capfilt", "img2dataset")
PATH_CHARS = st.sampled_from(list("abcxyz019-._/") + ["é", "ß", "カ", "日"])  # not "~": /~outside.jpg


def _verdict(body: bytes, charset, path: str):
    from capfilt.net.robots import Robots, parse
    rules, named = parse(body, charset)
    return Robots("http://h", rules=rules, named=named).refusal("http://h" + path, TOKENS)


@CHEAP
@given(body=st.binary(max_size=400) | st.text(max_size=200).map(str.encode),
       charset=st.sampled_from([None, "utf-8", "utf-16", "utf-16-be", "utf-32-le", "latin-1", "shift_jis", "cp500",
                                "no-such-charset", ""]),
       path=st.text(max_size=30))
def test_any_robots_txt_body_parses_and_gives_a_verdict(body, charset, path):
    verdict = _verdict(body, charset, "/" + path)
    assert verdict is None or verdict.startswith("robots_txt: disallowed for "), verdict


SPACE = st.sampled_from(["", " ", "  ", "\t", " \t ", "\x0c", "\x0b", "\u00a0", "\u2028", "\u3000", "\x85"])


@CHEAP
@given(data=st.data(), rule=st.text(PATH_CHARS, min_size=1, max_size=10), rest=st.text(PATH_CHARS, max_size=10),
       agent=st.sampled_from(["*", "capfilt", "CapFilt", "CAPFILT"]),
       fields=st.tuples(st.sampled_from(["User-agent", "user-agent", "USER-AGENT"]),
                        st.sampled_from(["Disallow", "disallow", "DISALLOW"])),
       eol=st.sampled_from(["\n", "\r\n", "\r"]), bom=st.booleans(),
       encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le+charset", "utf-16-be", "utf-32", "latin-1+charset",
                                 "latin-1"]))
def test_a_disallow_is_honoured_whatever_its_encoding_line_ends_and_whitespace(
        data, rule, rest, agent, fields, eol, bom, encoding):
    """Disallow: /<rule> for capfilt (its own group or *), among other bots' groups, comments and blank
    lines, written with any line end, BOM or not, in UTF-8/16/32 or Latin-1, with whitespace of any kind
    around the field, colon and value: /<rule><rest> is refused (as written and percent-encoded), and a
    path outside the rule is not."""
    from urllib.parse import quote
    ua, dis = fields
    noise = data.draw(st.lists(st.sampled_from(["# a comment", "", "User-agent: otherbot", "Disallow: /",
                                                "Sitemap: http://h/s.xml", "Allow: /" + rule]), max_size=4))
    line = "".join([data.draw(SPACE), dis, data.draw(SPACE), ":", data.draw(SPACE), "/" + rule, data.draw(SPACE),
                    data.draw(st.sampled_from(["", "# why"]))])
    ours = [f"{ua}{data.draw(SPACE)}:{data.draw(SPACE)}{agent}", line]
    lines = [*ours, "", "User-agent: otherbot", *noise] if data.draw(st.booleans()) else \
        ["User-agent: otherbot", *noise, "", *ours]
    text = eol.join(lines) + eol
    codec, _, declared = encoding.partition("+")
    try:
        body = text.encode(codec)
    except UnicodeEncodeError:
        return  # not writable in that encoding (Latin-1 and カ)
    if bom and codec == "utf-8":  # UTF-16/32 come with theirs (utf-16-be: none)
        body = codecs.BOM_UTF8 + body
    charset = codec if declared else None
    for path in ("/" + rule + rest, quote("/" + rule + rest)):
        verdict = _verdict(body, charset, path)
        assert verdict and verdict.startswith("robots_txt: disallowed for capfilt"), (body, path, verdict)
    assert _verdict(body, charset, "/~outside.jpg") is None, body


RULE_PATH = st.text(st.sampled_from("ab/*"), max_size=5).map(lambda p: "/" + p) | st.just("/")


@CHEAP
@given(groups=st.lists(st.tuples(st.sampled_from(["*", "capfilt", "img2dataset", "otherbot"]),
                                 st.lists(st.tuples(st.sampled_from(["Allow", "Disallow"]),
                                                    st.tuples(RULE_PATH, st.sampled_from(["", "$"])).map("".join)),
                                          max_size=4)), max_size=4),
       paths=st.lists(st.text(st.sampled_from("ab/"), max_size=6).map(lambda p: "/" + p), min_size=1, max_size=5))
@pytest.mark.slow
def test_robots_verdicts_do_not_depend_on_bom_line_ends_or_unicode_encoding(groups, paths):
    """The same rules give the same verdict for every path whether the file is plain UTF-8 with LF, has a
    BOM, CRLF or CR line ends, or is UTF-16/32."""
    text = "\n".join(f"User-agent: {agent}\n" + "".join(f"{field}: {value}\n" for field, value in rules)
                     for agent, rules in groups)
    forms = [b"\xef\xbb\xbf" + text.encode(), text.replace("\n", "\r\n").encode(), text.replace("\n", "\r").encode(),
             text.encode("utf-16"), text.encode("utf-32"), text.encode("utf-16-be")]
    for path in paths:
        plain = _verdict(text.encode(), None, path)
        assert all(_verdict(body, None, path) == plain for body in forms), (text, path)


@CHEAP
@given(value=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_retry_after_never_raises_and_is_none_or_a_finite_wait(value):
    from capfilt.net.polite import MAX_DELTA_SECONDS, retry_after_s
    got = retry_after_s(value)
    assert got is None or (isinstance(got, float) and math.isfinite(got) and 0 <= got <= MAX_DELTA_SECONDS)


@CHEAP
@given(digits=st.text(st.sampled_from("0123456789"), min_size=1, max_size=40),
       before=st.sampled_from(["", " ", "\t"]), after=st.sampled_from(["", " ", "\t "]))
def test_retry_after_ascii_digits_parse_exactly(digits, before, after):
    from capfilt.net.polite import MAX_DELTA_SECONDS, retry_after_s
    assert retry_after_s(before + digits + after) == float(min(int(digits), MAX_DELTA_SECONDS))


@CHEAP
@given(value=st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6).filter(
    lambda v: not v.isascii()))
def test_retry_after_in_digits_that_are_not_ascii_is_ignored(value):
    from capfilt.net.polite import retry_after_s
    assert retry_after_s(value) is None, value


@CHEAP
@given(when=st.datetimes(min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(9999, 12, 30)))
def test_retry_after_http_dates_give_the_seconds_left(when):
    import email.utils

    from capfilt.net.polite import MAX_DELTA_SECONDS, retry_after_s
    now = 2_000_000_000.0
    stamp = when.replace(tzinfo=datetime.timezone.utc).timestamp()
    expected = min(max(0.0, stamp - now), MAX_DELTA_SECONDS)
    assert retry_after_s(email.utils.format_datetime(when.replace(tzinfo=datetime.timezone.utc), usegmt=True),
                         now=now) == pytest.approx(expected, abs=1)
