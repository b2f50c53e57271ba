"""Concept balancing (MetaCLIP): the matcher against MetaCLIP's own loop, the entries file's refusals,
and the stage in a curate run (counts, keep probabilities and draws, rejects, inspect, rerun, other t)."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.cli import main as cli
from capfilt.jobs.curate import main as curate
from capfilt.pipelines.output import read_manifest
from capfilt.udfs.balance import EntryIndex, prepare_entries, spacing, substring_matches
from helpers import shapes_args

WORDS = ["red", "blue", "a", "st", "louis", "new", "york", "circle", "square", "c++", "é", "x", ""]
TRICKY = [",", ".", ";", ":", "?", "!", "`", "\t", "\n", "\r", "  ", "St.", "New York", "U.S.", "'s", "-"]


def _random_text(rng: random.Random, pieces: list[str], n: int) -> str:
    return "".join(rng.choice(pieces) + rng.choice([" ", " ", "", "  ", ",", ". "]) for _ in range(n))


def test_the_index_matches_exactly_what_metaclips_loop_matches():
    """Entries and captions with punctuation, tabs, line breaks, repeated spaces, upper case and entries that
    can never match (MetaCLIP spaces the caption, not the entry): the same ids as the loop, caption by caption."""
    rng = random.Random(7)
    raw = [_random_text(rng, WORDS + TRICKY, rng.choice([1, 1, 2, 3, 5])) for _ in range(3000)]
    raw += ["st. louis", "new  york", "a , b", "red", "RED", " red ", "x\ty"]
    entries, repeats = prepare_entries(raw)
    assert repeats > 0 and "red" in entries and entries.count("red") == 1
    index = EntryIndex(entries)
    spaced = [f" {e} " for e in entries]
    captions = [_random_text(rng, WORDS + TRICKY + ["RED", "Circle"], rng.randint(0, 25)) for _ in range(1500)]
    captions += ["", "RED circle", "new york, st. louis", "a\tb\nc", "red\r\nblue"]
    matched = 0
    for caption in captions:
        got = index.match(caption)
        assert got == substring_matches(caption, spaced), caption
        matched += bool(got)
    assert matched > len(captions) // 2  # the data exercises matching, not just misses
    assert index.match("RED circle") == sorted({entries.index("red"), *([entries.index("circle")] if "circle" in entries else [])})


def test_spacing_is_metaclips_after_lower_casing():
    assert spacing("A cat, on\ta Mat.") == " a cat ,  on a mat .  "


def test_an_index_of_500k_entries_builds_in_seconds_and_answers_without_scanning_them():
    """At MetaCLIP's scale (500k entries), a caption costs what its words cost, not what the entries cost."""
    import time
    entries = [f"w{i}" if i % 3 else f"w{i} w{i + 1}" for i in range(500_000)]
    index = EntryIndex(entries)
    assert index.build_seconds < 20 and index.size_bytes() > 0
    caption = " ".join(f"w{i}" for i in range(0, 60, 2))
    started = time.perf_counter()
    for _ in range(200):
        got = index.match(caption)
    assert (time.perf_counter() - started) / 200 < 0.005
    assert [entries[i] for i in got] == [f"w{i}" for i in range(0, 60, 2) if i % 3]


@pytest.mark.parametrize("content, says", [
    (b"", "holds no entry"),
    (b"\n  \n\n", "holds no entry"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    (b"caf\xe9\n", "is not UTF-8 text"),
    (None, "is not a file"),
    ("parquet", "has no column 'entry'"),
])
def test_a_bad_entries_file_is_one_line_before_spark(tmp_path, refused_before_spark, content, says):
    entries = tmp_path / ("entries.parquet" if content == "parquet" else "entries.txt")
    if content == "parquet":
        pq.write_table(pa.table({"name": ["red"]}), entries)
    elif content is not None:
        entries.write_bytes(content)
    out = tmp_path / "out"
    err = refused_before_spark(curate, [*shapes_args(tmp_path), "--output", out,
                                        "--set", f"balance.entries={entries}"], tmp_path)
    assert says in err and "balance.entries" in err and not out.exists()


def test_t_below_one_is_refused(tmp_path, refused_before_spark):
    entries = tmp_path / "entries.txt"
    entries.write_text("red\n")
    err = refused_before_spark(curate, [*shapes_args(tmp_path), "--output", tmp_path / "out",
                                        "--set", f"balance.entries={entries}", "--set", "balance.t=0"], tmp_path)
    assert "balance.t" in err


def _reference(rows: list[dict], entries: list[str], t: int) -> dict:
    """{uid: (matched entries, keep probability)} by MetaCLIP's loop over each row's kept captions."""
    spaced = [f" {e} " for e in entries]
    ids = {r["uid"]: sorted({i for c in r["candidates"] if c["kept"] for i in substring_matches(c["text"], spaced)})
           for r in rows}
    counts = np.bincount([i for found in ids.values() for i in found], minlength=len(entries))
    probs = np.minimum(1.0, t / np.maximum(counts, 1))
    return {uid: ([entries[i] for i in found], 1.0 - float(np.prod(1.0 - probs[found])) if found else None,
                  max(found, key=lambda i: (counts[i], -i)) if found else None, counts)
            for uid, found in ids.items()}


@pytest.mark.slow
def test_balancing_a_curated_run(curated_out, curate_args, tmp_path, capsys):
    """balance.entries on a committed run: the four earlier stages are reused; every row's entries and keep
    probability equal MetaCLIP's loop and t/count over the run's rows; the rows kept are the draws below their
    probability (conserved, seeded per uid: a killed run's rerun is identical); a dropped row names its most
    frequent entry and that entry's count; inspect shows the counts; another t, or other entries in the same
    file, recompute balance alone."""
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    entries = tmp_path / "entries.txt"
    entries.write_text("Circle\nsquare\ntriangle\nred\nblue\nblack background\nwhite background\nsquare\nzebra\n")
    on = ["--set", f"balance.entries={entries}", "--set", "balance.t=8"]
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    log = capsys.readouterr().out
    assert "stage 5/5: balance" in log and log.count("committed by an earlier run, reused") == 4
    manifest = read_manifest(out)
    counts = manifest["counts"]
    assert counts["input"] == counts["output"] + counts["rejected_total"]
    before = pq.read_table(curated_out / "curated").to_pylist()
    names, _ = prepare_entries(entries.read_text().splitlines())
    expected = _reference(before, names, 8)
    curated = pq.read_table(out / "curated").sort_by("uid")
    kept = {r["uid"]: r for r in curated.to_pylist()}
    rejects = [r for r in pq.read_table(out / "rejects").to_pylist() if r["stage"] == "balance"]
    assert len(kept) + len(rejects) == len(before) and 0 < len(rejects) < len(before)
    for uid, row in kept.items():
        assert row["balance_entries"] == expected[uid][0] and expected[uid][1] is not None
        assert abs(row["balance_prob"] - expected[uid][1]) < 1e-12
    for r in rejects:
        found, prob, top, entry_counts = expected[r["uid"]]
        if not found:
            assert r["reason"] == "no_entry"
        else:
            assert r["reason"] == "balanced_out" and prob < 1
            assert r["detail"].startswith(f"most frequent entry '{names[top]}' in {entry_counts[top]} rows")
    report = manifest["models"]["balance"]
    assert report["rows"] == len(before) and report["kept"] == len(kept)
    assert report["head"][0][:2] == [names[int(np.argmax(entry_counts))], int(entry_counts.max())]
    assert report["entries"] == len(names) == 8 and report["repeats_merged"] == 1
    assert cli(["inspect", str(out), "--html", str(tmp_path / "report.html")]) == 0
    text, html = capsys.readouterr().out, (tmp_path / "report.html").read_text()
    assert "concept balance:" in text and f"{len(kept):,} of {len(before):,} rows kept" in text
    assert "Concept balance" in html and "<polyline" in html and "balanced_out" in html
    # killed after balance wrote its output but before it committed: the rerun ends where the first did
    (out / "stages" / "balance" / "manifest.json").unlink()
    (out / "manifest.json").unlink()
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    assert pq.read_table(out / "curated").sort_by("uid").equals(curated)
    assert read_manifest(out)["counts"] == counts
    capsys.readouterr()
    # another t: only balance runs again, and keeps more
    assert curate([*curate_args, "--set", f"balance.entries={entries}", "--set", "balance.t=1000",
                   "--output", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("committed by an earlier run, reused") == 4 and "stage 5/5: balance" in log
    assert read_manifest(out)["counts"]["rejected"]["balance"] == {"no_entry": sum(1 for v in expected.values() if not v[0])}
    # the same path holding other entries: balance runs again (its manifest keeps the file's digest)
    entries.write_text("zebra\n")
    assert curate([*curate_args, "--set", f"balance.entries={entries}", "--set", "balance.t=1000",
                   "--output", str(out)]) == 0
    assert read_manifest(out)["counts"]["rejected"]["balance"] == {"no_entry": len(before)}


def test_each_epoch_draws_a_fresh_subset_with_each_samples_keep_probability():
    """keep_in_epoch over 400 epochs: each sample's share of epochs is its probability (within 4 standard
    errors), an epoch's draw is the same every time it is asked, two epochs differ, no probability: kept."""
    from capfilt.udfs.balance import keep_in_epoch
    probs = {f"u{i}": p for i, p in enumerate(np.linspace(0.02, 1.0, 50))}
    epochs = 400
    for uid, p in probs.items():
        share = sum(keep_in_epoch({"json": {"uid": uid, "balance_prob": p}}, e) for e in range(epochs)) / epochs
        assert abs(share - p) <= 4 * (p * (1 - p) / epochs) ** 0.5 + 1e-9, (uid, p, share)
    subset = [[keep_in_epoch({"uid": u, "balance_prob": 0.5}, e) for u in probs] for e in (0, 0, 1)]
    assert subset[0] == subset[1] and subset[0] != subset[2]
    assert keep_in_epoch({"json": b'{"uid": "x"}'}, 0) and not keep_in_epoch({"uid": "x", "balance_prob": 0.0}, 0)


@pytest.mark.slow
def test_balancing_at_the_loader_keeps_every_matched_row_and_the_export_carries_its_probability(
        curated_out, curate_args, tmp_path, spark):
    """balance.mode=loader: only rows matching no entry leave; the WebDataset export's json holds each
    sample's entries and keep probability, export.json the expected samples per epoch, and a webdataset
    pipeline that selects with keep_in_epoch reads that epoch's subset."""
    import json

    import webdataset as wds

    from capfilt.pipelines.export import export
    from capfilt.udfs.balance import keep_in_epoch
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    entries = tmp_path / "entries.txt"
    entries.write_text("circle\nsquare\ntriangle\nred\nblue\n")
    assert curate([*curate_args, "--set", f"balance.entries={entries}", "--set", "balance.t=8",
                   "--set", "balance.mode=loader", "--output", str(out)]) == 0
    manifest = read_manifest(out)
    expected = _reference(pq.read_table(curated_out / "curated").to_pylist(), ["circle", "square", "triangle", "red",
                                                                               "blue"], 8)
    assert set(manifest["counts"]["rejected"]["balance"]) == {"no_entry"}
    assert manifest["counts"]["output"] == sum(1 for v in expected.values() if v[0])
    summary = export(spark, str(out), "webdataset", str(tmp_path / "wds"), samples_per_shard=32)
    samples = [json.loads(s["json"]) for s in wds.WebDataset(summary["train_data"], shardshuffle=False)]
    assert len(samples) == manifest["counts"]["output"]
    for s in samples:
        assert s["balance_entries"] == expected[s["uid"]][0] and abs(s["balance_prob"] - expected[s["uid"]][1]) < 1e-12
    assert summary["balance_expected_samples_per_epoch"] == round(sum(s["balance_prob"] for s in samples), 1)
    assert summary["balance_expected_samples_per_epoch"] < len(samples)
    epoch = [s["uid"] for s in samples if keep_in_epoch(s, 5)]
    drawn = [json.loads(s["json"])["uid"] for s in wds.WebDataset(summary["train_data"], shardshuffle=False)
             .select(lambda s: keep_in_epoch(s, 5))]
    assert drawn == epoch and 0 < len(drawn) < len(samples)
