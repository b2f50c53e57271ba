"""The balance stage (MetaCLIP's concept balancing): scored -> scored + balance_entries, balance_prob (+ rejects).

Off unless `balance.entries` names a metadata file (one entry per line, or Parquet). Each row's caption(s)
(`balance.captions`: the kept candidates, the primary caption or the web caption) are matched against
every entry with MetaCLIP's semantics (udfs/balance.py: lower-cased, whole entries as space-padded
substrings of the spaced caption), by an index built once per Python worker. Spark counts the rows per
entry over the whole input; an entry matched by `count` rows keeps each with probability
min(1, t / count), and a row stays when any of its entries lets it (MetaCLIP's balance_sampling): its
keep probability is 1 - prod(1 - min(1, t / count)) over its entries, and one uniform draw seeded by
(seed, uid) decides, so a rerun keeps the same rows (`balance.mode: loader`: every matched row stays
with its probability, and the training loader draws a fresh subset each epoch:
udfs/balance.py `keep_in_epoch`). Rows matching no entry stay or leave
(`balance.unmatched`). Every kept row carries its entries and its keep probability (a loader can
draw a fresh balanced subset per epoch from it); a dropped row names its most frequent entry. MetaCLIP
balances last, after the safety filters and dedup: so does this chain (docs/filters.md).
"""
from __future__ import annotations

import math

import pandas as pd  # module level: Spark reads the pandas UDFs' type hints from these globals

from capfilt.pipelines.stage import Result, Section, Stage, reject_rows
from capfilt.schemas import SCORED, Field
from capfilt.schemas.contract import FLOAT64, STRING, list_of

STAGE = "balance"
ENTRIES = Field("balance_entries", list_of(STRING), False, "the metadata entries its caption(s) matched")
PROB = Field("balance_prob", FLOAT64, False,
             "chance balancing keeps the row: 1 - prod(1 - min(1, t/count)) over its entries")
REASONS = {
    "balanced_out": "its entries are frequent and the draw (seeded by uid) left it out (detail: its most frequent "
                    "entry, that entry's row count, the row's keep probability)",
    "no_entry": "its caption(s) matched no metadata entry (balance.unmatched: drop)",
}
SHOWN = 20       # entries in the report's head and tail tables
CURVE = 120      # points of the counts-by-rank curve kept in the manifest


def read_entries(path: str, column: str = "entry") -> tuple[list[str], int, str]:
    """The entries of a file: (entries lower-cased and distinct, repeats merged, sha256 of the entries).
    Parquet (by its magic bytes) gives `column`; anything else is UTF-8 text, one entry per line. One
    line for a file that is missing, binary, or holds no entry."""
    import hashlib

    import fsspec

    from capfilt.udfs.balance import prepare_entries
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local) or fs.isdir(local):
        raise ValueError(f"balance.entries: {path} is not a file")
    with fs.open(local, "rb") as f:
        data = f.read()
    if data[:4] == b"PAR1":
        import io

        import pyarrow.parquet as pq
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:
            raise ValueError(f"balance.entries: {path} is not a readable Parquet file ({e})") from None
        if column not in table.column_names:
            raise ValueError(f"balance.entries: {path} has no column {column!r} (balance.entries_column; "
                             f"columns: {', '.join(table.column_names)})")
        raw = [v for v in table.column(column).to_pylist() if v is not None]
    else:
        if b"\x00" in data[:65536]:
            raise ValueError(f"balance.entries: {path} is a binary file, not text with one entry per line or Parquet")
        try:
            raw = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"balance.entries: {path} is not UTF-8 text (one entry per line) or Parquet") from None
    entries, repeats = prepare_entries(raw)
    if not entries:
        raise ValueError(f"balance.entries: {path} holds no entry (blank lines are skipped)")
    return entries, repeats, hashlib.sha256("\n".join(entries).encode()).hexdigest()


def check(cfg, input_root: str | None = None) -> None:
    """On the driver, before Spark: the entries file reads and holds entries."""
    read_entries(cfg.balance.entries, cfg.balance.entries_column)


def entries_digest(cfg) -> dict:
    """{balance.entries: sha256 of the file's bytes}: the same path with other entries makes the output stale."""
    import hashlib

    import fsspec
    try:
        with fsspec.open(cfg.balance.entries, "rb") as f:
            return {"balance.entries": hashlib.sha256(f.read()).hexdigest()}
    except OSError:  # missing or unreadable: `check` refuses it with one line
        return {}


def texts(which: str):
    """The caption(s) matched, as an array<string> column."""
    from pyspark.sql import functions as F
    if which == "web":
        return F.array("caption")
    if which == "primary":
        return F.array("caption_primary")
    return F.expr("transform(filter(candidates, c -> c.kept), c -> c.text)")


def uniform(seed: int, salt: str = STAGE):
    """A draw in [0, 1) per row from (seed, salt, uid): the same on every rerun, independent of partitioning;
    another salt (the export's caption mix) draws independently of balancing's."""
    from pyspark.sql import functions as F
    bits = F.xxhash64(F.lit(seed), F.lit(salt), F.col("uid")).bitwiseAND(F.lit((1 << 53) - 1))
    return bits.cast("double") / float(1 << 53)


def split(rows, cfg, context) -> Result:
    import numpy as np
    from pyspark.sql import functions as F
    from pyspark.sql import types as T
    s = cfg.balance
    entries, repeats, digest = read_entries(s.entries, s.entries_column)
    sc = rows.sparkSession.sparkContext
    shipped = sc.broadcast(entries)

    def match(captions: pd.Series) -> pd.Series:
        from capfilt.udfs.balance import index_for
        index = index_for(digest, shipped.value)
        return pd.Series([sorted({i for text in (row if row is not None else ()) if text
                                  for i in index.match(text)}) for row in captions])
    matched = rows.withColumn("_ids", F.pandas_udf(match, T.ArrayType(T.IntegerType()))(texts(s.captions))) \
        .localCheckpoint()
    counts = np.zeros(len(entries), dtype=np.int64)
    for row in matched.select(F.explode("_ids").alias("id")).groupBy("id").count().collect():
        counts[row["id"]] = row["count"]
    probs = np.minimum(1.0, s.t / np.maximum(counts, 1))
    table = sc.broadcast((counts, probs))

    def keep(ids: pd.Series) -> pd.DataFrame:
        """Per row: its keep probability, and its most frequent entry with that entry's row count."""
        c, p = table.value
        prob, top, top_count = [], [], []
        for row in ids:
            row = np.asarray(row, dtype=np.int64)
            first = row[np.argmax(c[row])] if len(row) else None
            prob.append(1.0 - float(np.prod(1.0 - p[row])) if len(row) else None)
            top.append(None if first is None else shipped.value[first])
            top_count.append(None if first is None else int(c[first]))
        return pd.DataFrame({"prob": prob, "top": top, "top_count": top_count})
    shape = T.StructType([T.StructField("prob", T.DoubleType()), T.StructField("top", T.StringType()),
                          T.StructField("top_count", T.LongType())])
    unmatched = 1.0 if s.unmatched == "keep" else 0.0
    names = F.pandas_udf(lambda ids: pd.Series([[shipped.value[i] for i in row] for row in ids]),
                         T.ArrayType(T.StringType()))
    marked = matched.withColumn("_keep", F.pandas_udf(keep, shape)("_ids")) \
        .withColumn(PROB.name, F.coalesce(F.col("_keep.prob"), F.lit(unmatched))) \
        .withColumn("_u", uniform(cfg.seed)) \
        .withColumn(ENTRIES.name, names("_ids")).localCheckpoint()  # read by four jobs below
    # drop: the row's draw decides here; loader: every row a draw could keep stays, for a draw per epoch
    stays = (F.col("_u") < F.col(PROB.name)) if s.mode == "drop" else (F.col(PROB.name) > 0)
    kept, dropped = marked.filter(stays), marked.filter(~stays)
    reason = F.when(F.size("_ids") == 0, F.lit("no_entry")).otherwise(F.lit("balanced_out"))
    detail = F.when(F.size("_ids") == 0, F.lit(f"no entry matched balance.captions={s.captions}")).otherwise(F.concat(
        F.lit("most frequent entry '"), F.col("_keep.top"), F.lit("' in "), F.col("_keep.top_count").cast("string"),
        F.lit(" rows; keep probability "), F.format_number(F.col(PROB.name), 6)))
    after = np.zeros(len(entries), dtype=np.int64)
    for row in kept.select(F.explode("_ids").alias("id")).groupBy("id").count().collect():
        after[row["id"]] = row["count"]
    totals = marked.agg(F.count("*").alias("rows"), F.sum((F.size("_ids") > 0).cast("long")).alias("matched"),
                        F.sum(PROB.name).alias("expected"), F.sum(stays.cast("long")).alias("kept")).first()
    report = {
        "entries": len(entries), "repeats_merged": repeats, "entries_sha256": digest, "t": s.t,
        "captions": s.captions, "unmatched": s.unmatched, "mode": s.mode, "rows": totals["rows"],
        "rows_matched": totals["matched"] or 0, "entries_matched": int((counts > 0).sum()),
        "entries_capped": int((counts > s.t).sum()), "expected_kept": round(float(totals["expected"] or 0), 3),
        "kept": totals["kept"] or 0, **figures(entries, counts, after)}
    return Result(kept.drop("_ids", "_keep", "_u"), reject_rows(dropped, STAGE, reason, detail), report)


def figures(entries: list[str], before, after) -> dict:
    """The report's head and tail of the matched entries by row count (before, after balancing) and
    the counts by rank on a log scale: what `capfilt inspect` prints and plots."""
    import numpy as np
    order = np.lexsort((np.arange(len(before)), -before))
    order = order[before[order] > 0]
    rows = [[entries[i], int(before[i]), int(after[i])] for i in order]
    ranks = sorted({int(round(r)) for r in np.geomspace(1, len(order), min(CURVE, len(order)))}) if len(order) else []
    descending = np.sort(after)[::-1]
    return {"head": rows[:SHOWN], "tail": rows[-SHOWN:] if len(rows) > SHOWN else [],
            "curve": {"rank": ranks, "before": [int(before[order[r - 1]]) for r in ranks],
                      "after": [int(descending[r - 1]) for r in ranks]}}


# ---------------------------------------------------------------------------------------------------
# capfilt inspect: the entry counts before and after.

def section_figures(spark, root: str, top: int):
    """The stage's report from its manifest (root: a curate OUT, or the balance output itself)."""
    from capfilt.pipelines.output import NotCommittedError, read_manifest
    from capfilt.pipelines.publish import stage_dir
    for where in (root, stage_dir(root, STAGE)):
        try:
            manifest = read_manifest(where)
        except NotCommittedError:
            continue
        if manifest.get("stage") == STAGE:
            return manifest.get("models")
    return None


def summary(f: dict) -> str:
    kept = (f"{f['kept']:,} of {f['rows']:,} rows kept (expected {f['expected_kept']:,.1f} at t={f['t']:,})"
            if f.get("mode", "drop") == "drop" else
            f"{f['kept']:,} of {f['rows']:,} rows kept for the loader's draw (expected per epoch "
            f"{f['expected_kept']:,.1f} at t={f['t']:,})")
    return (f"{kept}; {f['rows_matched']:,} rows matched {f['entries_matched']:,} of {f['entries']:,} entries, "
            f"{f['entries_capped']:,} above t")


def section_text(f: dict | None, root: str) -> list[str]:
    from capfilt.pipelines.report import aligned, clipped
    if not f:
        return [f"concept balance: omitted, {root}/stages/{STAGE} is not there"]
    lines = [f"concept balance: {summary(f)}; unmatched rows: {f['unmatched']}"]
    for title, rows in (("most frequent", f["head"]), ("least frequent", f["tail"])):
        if rows:
            lines += [""] + aligned([(f"entry ({title})", "rows before", "after")] +
                                    [(clipped(e, 48), f"{b:,}", f"{a:,}") for e, b, a in rows], {1, 2})
    return lines


def section_html(f: dict | None, root: str) -> str:
    from html import escape as e

    from capfilt.pipelines.report_html import table
    if not f:
        return f"<p>Omitted: {e(root)}/stages/{STAGE} is not there.</p>"
    head = f"<p>{e(summary(f))}.</p>"
    tables = "".join(table((f"entry ({title})", "rows before", "after"), [(n, f"{b:,}", f"{a:,}") for n, b, a in rows],
                           {1, 2}) for title, rows in (("most frequent", f["head"]), ("least frequent", f["tail"])) if rows)
    return head + curve_svg(f["curve"], f["t"]) + f'<div class="side">{tables}</div>'


def curve_svg(curve: dict, t: int) -> str:
    """Rows per entry by rank, log-log, before (grey) and after (blue) balancing, with the line at t."""
    if not curve["rank"]:
        return ""
    w, h, pad = 420, 220, 36
    top = max(max(curve["before"]), t, 1)
    last = max(curve["rank"][-1], 2)

    def xy(rank, count):
        x = pad + (w - 2 * pad) * math.log(rank) / math.log(last)
        y = h - pad - (h - 2 * pad) * math.log(max(count, 1)) / math.log(max(top, 2))
        return f"{x:.1f},{y:.1f}"
    lines = "".join(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                    + " ".join(xy(r, c) for r, c in zip(curve["rank"], curve[key])) + '"/>'
                    for key, colour in (("before", "#999"), ("after", "#2a6fdb")))
    ty = xy(1, t).split(",")[1]
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="rows per entry by rank, before and after">'
            f'<line x1="{pad}" x2="{w - pad}" y1="{ty}" y2="{ty}" stroke="#d33" stroke-dasharray="4"/>{lines}'
            f'<text x="{pad}" y="{h - 8}" font-size="11">entry rank (log) - grey: before, blue: after, red: t</text>'
            f'<text x="4" y="{pad - 8}" font-size="11">rows (log), max {top:,}</text></svg>')


DEFINITION = Stage(name=STAGE, reads=SCORED, adds=(ENTRIES, PROB), reasons=REASONS, split=split, check=check,
                   depends=("seed",), help="balance concepts (MetaCLIP): keep rows of frequent entries with "
                                           "probability t/count",
                   enabled=lambda cfg: bool(cfg.balance.entries), inputs=entries_digest,
                   inspect=(Section("balance", "Concept balance", section_figures, section_text, section_html),))
