"""`capfilt inspect`: the funnel and the score quantiles equal what the output holds, each stage's
figures (seconds, rows, rows/s, MB written, model passes) are the manifest's, the download failure
map counts fetched rows by outcome, code, HTTP status and host, the gallery is a bounded
deterministic sample, and the HTML report shows hostile captions, URLs, uids, details and
reasons as text in headless Chromium (whose run of the page's own script proves scripts were on).

The curated output is built here with pyarrow (images drawn by capfilt.world.scene), so these tests need
neither the models nor the pipeline."""
import base64
import hashlib
import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.jobs.cli import main as cli
from capfilt.pipelines.report import QUANTILES, ReportMismatch, build, gallery, stage_figures, stage_table
from capfilt.pipelines.report_html import render, script_json
from capfilt.schemas import CAPTIONED, CURATED, DOWNLOADED, REJECTS, SCORED
from capfilt.world.scene import encode_jpeg, render as render_scene, sample_scene

# Each payload, if it ever ran, marks the page: the title becomes PWNED, or an element gets id=pwned.
TITLE = "document.title='PWNED'"
ELEMENT = "document.body.appendChild(document.createElement('b')).id='pwned'"
PAYLOADS = [f"<script>{TITLE}</script>", f"<img src=x onerror=\"{TITLE}\">", f"\"><svg onload=\"{ELEMENT}\">",
            f"</script><script>{ELEMENT}</script>", f"' onmouseover='{TITLE}' autofocus onfocus='{TITLE}' x='",
            f"<iframe srcdoc=\"<script>parent.{TITLE}</script>\"></iframe>", f"<!--<script>{TITLE}</script>-->",
            f"\u2028</script><script>{ELEMENT}</script>"]
URLS = ["javascript:alert(1)", f"javascript:{TITLE}", f"http://example.com/\"><script>{TITLE}</script>.jpg",
        f"data:text/html,<script>{TITLE}</script>", "https://example.com/ok.jpg"]
HOSTILE_REASON = f"</script><script>{ELEMENT}</script>"

# uid -> (stage, reason) for every rejected row of the fixture; everything else is curated.
FATES = {
    **{f"u{i:03d}": ("download", "invalid_url") for i in (1, 2)},
    **{f"u{i:03d}": ("download", "failed_to_download") for i in (3, 4, 5)},
    "u006": ("download", "duplicate_uid"),
    **{f"u{i:03d}": ("filter", "no_aligned_caption") for i in (7, 8, 9)},
    **{f"u{i:03d}": ("dedup", "near_duplicate_image") for i in (10, 11, 12, 13)},
    **{f"u{i:03d}": ("dedup", "exact_duplicate") for i in (14, 15)},
    "u016": ("dedup", HOSTILE_REASON),
}
N = 42
STAGE_ORDER = ("download", "caption", "filter", "dedup")
MB = 2**20
# The run's figures per stage beyond counts (rows in/out are the counts), as the manifest records them:
# seconds, bytes of Parquet written, rows per model, reused. caption was taken from an earlier run.
FIGURES = {
    "download": {"seconds": 12.5, "bytes_written": 3 * MB // 2, "model_passes": {}, "reused": False},
    "caption": {"seconds": 90.0, "bytes_written": 5_452_595, "model_passes": {"captioner": 0}, "reused": True},
    "filter": {"seconds": 4.0, "bytes_written": 3 * MB, "model_passes": {"clip": 36}, "reused": False},
    "dedup": {"seconds": 2.5, "bytes_written": 2 * MB, "model_passes": {}, "reused": False},
}
WRITE = {"seconds": 0.8, "counts": {"input": 26, "output": 26, "rejected_total": 0, "rejected": {}},
         "bytes_written": MB, "model_passes": {}, "reused": False}
# What the report shows for them, worked out by hand: rows/s = rows in / seconds (42 / 12.5 = 3.36),
# MB = bytes / 2**20 (5,452,595 bytes = 5.1999998 MB); write ran 0.8 s: 26 / 0.8 = 32.5 rows/s.
STAGE_ROWS = [
    ["download", "12.5", "42", "36", "3.4", "1.50", "none"],
    ["caption (reused)", "90.0", "36", "36", "0.4", "5.20", "captioner 0"],
    ["filter", "4.0", "36", "33", "9.0", "3.00", "clip 36"],
    ["dedup", "2.5", "33", "26", "13.2", "2.00", "none"],
    ["write", "0.8", "26", "26", "32.5", "1.00", "none"],
]


def _rows(n=N):
    """Every input row with the columns of every stage; deterministic."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        uid = f"u{i:03d}"
        image = encode_jpeg(render_scene(sample_scene(rng), 64, rng))
        web = float(np.float32(rng.uniform(-0.3, 0.95)))
        synthetic = [float(np.float32(s)) for s in rng.uniform(0.7, 0.97, size=3)]
        candidates = [{"text": PAYLOADS[i % len(PAYLOADS)] if i % 3 == 0 else f"web caption {i}", "source": "web",
                       "score": web, "kept": web >= 0.85}]
        candidates += [{"text": f"a synthetic caption {i}.{k}", "source": "synthetic", "score": s, "kept": s >= 0.85}
                       for k, s in enumerate(synthetic)]
        if i % 5 == 0:
            candidates.append({"text": f"inherited {i}", "source": "inherited_synthetic",
                               "score": float(np.float32(0.9)), "kept": True})
        if i % 7 == 0:  # a candidate the scorer could not score: not part of any quantile
            candidates.append({"text": "unscored", "source": "synthetic", "score": None, "kept": False})
        kept = [c for c in candidates if c["kept"]]
        rows.append({
            "uid": f"{uid}" if i % 4 else f"{uid}<b id=pwned>",  # uids are untrusted too
            "key": uid, "url": URLS[i % len(URLS)] if i % 2 == 0 else f"http://127.0.0.1:1/img/{i}.jpg",
            "caption": PAYLOADS[i % len(PAYLOADS)] if i % 3 == 0 else f"web caption {i}",
            "image": image, "width": 64, "height": 64, "original_width": 64, "original_height": 64,
            "sha256": hashlib.sha256(image).hexdigest(),
            "synthetic_captions": [c["text"] for c in candidates if c["source"] == "synthetic"],
            "candidates": candidates, "best_score": max(c["score"] for c in candidates if c["score"] is not None),
            "image_embedding": np.zeros(8, np.float16).tobytes(),
            "caption_primary": max(kept, key=lambda c: c["score"])["text"] if kept else candidates[1]["text"],
        })
    return rows


def _write(folder, rows, contract, name="part-00000.parquet"):
    folder.mkdir(parents=True, exist_ok=True)
    schema = contract.arrow_schema()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema),
                   folder / name, compression="zstd")


def _reject(row, stage, reason, detail=None):
    detail = PAYLOADS[(int(row["key"][1:]) + 1) % len(PAYLOADS)] if detail is None else detail
    return {"uid": row["uid"], "url": row["url"], "caption": row["caption"], "stage": stage, "reason": reason,
            "detail": detail, "duplicate_of": "u020" if stage == "dedup" else None}


def _figures(counts, figures):
    """A stage's entry of the curate manifest: times, counts and the figures derived from them."""
    seconds = figures["seconds"]
    return {"started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z", "counts": counts,
            "rows_in": counts["input"], "rows_out": counts["output"], "rows_per_s": counts["input"] / seconds,
            **figures}


def _counts(n_in, rejects):
    by = {}
    for r in rejects:
        by.setdefault(r["stage"], {}).setdefault(r["reason"], 0)
        by[r["stage"]][r["reason"]] += 1
    total = sum(sum(v.values()) for v in by.values())
    return {"input": n_in, "output": n_in - total, "rejected_total": total, "rejected": by}


@pytest.fixture(scope="module")
def fixture_rows():
    return _rows()


@pytest.fixture(scope="module")
def out(tmp_path_factory, fixture_rows):
    return _make_out(tmp_path_factory.mktemp("inspect") / "out", fixture_rows, FATES)


def _make_out(root, rows, fates):
    """OUT as `capfilt curate` lays it out: manifest, curated (two files), rejects, stages/*. `fates`:
    key -> (stage, reason) or (stage, reason, detail) of each rejected row."""
    all_rejects, stage_counts = [], {}
    contracts = {"download": DOWNLOADED, "caption": CAPTIONED, "filter": SCORED, "dedup": CURATED}
    for stage in STAGE_ORDER:
        rejects = [_reject(r, stage, *fates[r["key"]][1:]) for r in rows if fates.get(r["key"], (None,))[0] == stage]
        gone = {r["uid"] for r in rejects}
        counts = _counts(len(rows), rejects)
        stage_counts[stage] = counts
        rows = [r for r in rows if r["uid"] not in gone]
        _write(root / "stages" / stage / "data", rows, contracts[stage])
        _write(root / "stages" / stage / "rejects", rejects, REJECTS)
        (root / "stages" / stage / "manifest.json").write_text(json.dumps(
            {"stage": stage, "finished_at": "2026-01-01T00:00:01Z", "counts": counts}))  # as _figures copies it
        all_rejects += rejects
    half = len(rows) // 2
    _write(root / "curated", rows[:half], CURATED, "part-00000.zstd.parquet")
    _write(root / "curated", rows[half:], CURATED, "part-00001.zstd.parquet")
    _write(root / "rejects", all_rejects, REJECTS)
    counts = _counts(stage_counts["download"]["input"], all_rejects)
    (root / "manifest.json").write_text(json.dumps({
        "stage": "curate", "finished_at": "2026-01-01T00:00:01Z", "seconds": 1.0, "counts": counts,
        "stages": {**{s: _figures(c, FIGURES[s]) for s, c in stage_counts.items()},
                   "write": _figures(WRITE["counts"], WRITE)}}))
    return root


@pytest.fixture(scope="module")
def report(spark, out):
    return build(spark, str(out))


def _expected_rejected():
    expected = {}
    for stage, reason in FATES.values():
        expected.setdefault(stage, {}).setdefault(reason, 0)
        expected[stage][reason] += 1
    return expected


@pytest.mark.slow
def test_the_funnel_counts_the_rows_of_every_stage(report):
    f = report["funnel"]
    assert f["after"] == [("input", 42), ("download", 36), ("caption", 36), ("filter", 33), ("dedup", 26)]
    assert f["rejected"] == _expected_rejected()
    assert f["curated"] == 26 and f["kept_fraction"] == pytest.approx(26 / 42)
    assert [(s["file"], s["rows"]) for s in report["shards"]] == [("part-00000.zstd.parquet", 13),
                                                                  ("part-00001.zstd.parquet", 13)]


def test_the_score_quantiles_and_kept_fractions_equal_numpys(report, fixture_rows):
    curated = [r for r in fixture_rows if r["key"] not in FATES]
    for source in ("web", "synthetic", "inherited_synthetic"):
        cands = [c for r in curated for c in r["candidates"] if c["source"] == source and c["score"] is not None]
        scores = np.array([c["score"] for c in cands], dtype=np.float64)
        got = report["scores"]["sources"][source]
        assert got["n"] == len(scores)
        assert np.allclose(list(got["quantiles"].values()), np.quantile(scores, QUANTILES), atol=1e-6)
        assert got["kept_fraction"] == pytest.approx(np.mean([c["kept"] for c in cands]))
        assert sum(got["histogram"]) == len(scores)
    assert list(report["scores"]["sources"])[:2] == ["web", "synthetic"]


@pytest.mark.slow
def test_the_text_report_prints_the_funnel_quantiles_and_files(out, fixture_rows, capsys):
    assert cli(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("42 rows in, 26 curated (61.9% kept)" in line for line in lines)
    for stage, n in [("input", 42), ("download", 36), ("caption", 36), ("filter", 33), ("dedup", 26)]:
        assert [stage, str(n)] in [line.split() for line in lines], stage
    for reasons in _expected_rejected().values():
        for reason, n in reasons.items():
            assert any(line.split()[-2:] == [reason, str(n)] for line in lines), reason
    curated = [r for r in fixture_rows if r["key"] not in FATES]
    web = np.array([c["score"] for r in curated for c in r["candidates"] if c["source"] == "web"])
    web_line = next(line.split() for line in lines if line.split()[:1] == ["web"])
    assert web_line[1] == str(len(web))
    assert web_line[3:] == [f"{v:.4f}" for v in np.quantile(web, QUANTILES)]
    assert any(line.split()[:3] == ["part-00001.zstd.parquet", "13", "rows"] for line in lines)
    for row in STAGE_ROWS:  # the per-stage figures
        assert row in [_cells(line) for line in lines], row


def _cells(line):
    """The cells of a line of the text stage table: columns are two or more spaces apart."""
    return re.split(r" {2,}", line.strip())


def _stage_rows(page):
    """The cells of the page's stage table as text, header first."""
    table = page.split("<h2>Stages</h2>", 1)[1].split("</table>", 1)[0]
    return [[html.unescape(re.sub(r"<[^>]*>", "", cell)) for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table)]


HEADER = ["stage", "seconds", "rows in", "rows out", "rows/s", "MB written", "model passes"]


def test_the_text_stage_table_shows_each_stages_seconds_rate_mb_and_model_passes(report):
    assert [_cells(line) for line in stage_table(report["stages"])] == [HEADER, *STAGE_ROWS]


def test_the_page_shows_the_same_stage_table(report):
    assert _stage_rows(render(report)) == [HEADER, *STAGE_ROWS]


def test_thousands_and_several_models_read_like_the_rest_of_the_report():
    figures = stage_figures({"stages": {"caption": {
        "seconds": 1234.5, "rows_in": 1000, "rows_out": 1000, "rows_per_s": 1000 / 1234.5, "bytes_written": 1536 * MB,
        "model_passes": {"captioner": 1000, "clip": 1000}, "reused": False}}})
    assert _cells(stage_table(figures)[1]) == ["caption", "1,234.5", "1,000", "1,000", "0.8", "1,536.00",
                                               "captioner 1,000 \u00b7 clip 1,000"]


@pytest.mark.slow
def test_a_manifest_from_before_the_stage_figures_still_renders(out, tmp_path, capsys):
    """Stages as publish.py wrote them before: times and counts only (seconds may be null), and a stage
    entry with neither counts nor figures. What is there is shown, the rest is a dash."""
    old = tmp_path / "out"
    shutil.copytree(out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    stages = {name: {k: stage[k] for k in ("started_at", "finished_at", "seconds", "counts")}
              for name, stage in manifest["stages"].items() if name != "write"}
    stages["dedup"]["seconds"] = None
    stages["write"] = {"seconds": 0.8}
    (old / "manifest.json").write_text(json.dumps({**manifest, "stages": stages}))
    expected = [HEADER,
                ["download", "12.5", "42", "36", "3.4", "\u2013", "\u2013"],
                ["caption", "90.0", "36", "36", "0.4", "\u2013", "\u2013"],
                ["filter", "4.0", "36", "33", "9.0", "\u2013", "\u2013"],
                ["dedup", "\u2013", "33", "26", "\u2013", "\u2013", "\u2013"],
                ["write", "0.8", "\u2013", "\u2013", "\u2013", "\u2013", "\u2013"]]
    page = tmp_path / "report.html"
    assert cli(["inspect", str(old), "--samples", "0", "--per-reason", "0", "--html", str(page)]) == 0
    assert _stage_rows(page.read_text(encoding="utf-8")) == expected
    assert [_cells(line) for line in stage_table(stage_figures({**manifest, "stages": stages}))] == expected
    assert stage_figures({}) == [] and stage_table([]) == ["  " + "  ".join(HEADER)]


def test_the_write_step_kept_beside_stages_is_the_last_row():
    figures = stage_figures({"stages": {"dedup": {"seconds": 2.5, "counts": {"input": 33, "output": 26}}},
                             "write": {"seconds": 0.8, "rows_in": 26, "rows_out": 26, "rows_per_s": 32.5,
                                       "bytes_written": MB, "model_passes": {}}})
    assert [_cells(line) for line in stage_table(figures)][1:] == [
        ["dedup", "2.5", "33", "26", "13.2", "\u2013", "\u2013"], STAGE_ROWS[-1]]


def test_odd_figures_in_a_hand_edited_manifest_show_as_dashes():
    figures = stage_figures({"stages": {"filter": {"seconds": "fast", "rows_in": True, "counts": "?",
                                                   "bytes_written": None, "model_passes": {"clip": "many"}},
                                        "dedup": "not a dict"}})
    assert [_cells(line) for line in stage_table(figures)][1:] == [
        ["filter", "\u2013", "\u2013", "\u2013", "\u2013", "\u2013", "clip \u2013"],
        ["dedup", "\u2013", "\u2013", "\u2013", "\u2013", "\u2013", "\u2013"]]


HOSTILE_STAGE = f"<script>{TITLE}</script>\x1b[2J"


def test_hostile_stage_and_model_names_are_text_on_the_page_and_in_the_terminal(report):
    figures = stage_figures({"stages": {HOSTILE_STAGE: {
        "seconds": 2.0, "rows_in": 10, "rows_out": 9, "rows_per_s": 5.0, "bytes_written": MB,
        "model_passes": {PAYLOADS[1]: 10}, "reused": True}}})
    page = render({**report, "stages": figures})
    assert f"<script>{TITLE}" not in page and PAYLOADS[1] not in page
    assert _stage_rows(page)[1] == [f"{HOSTILE_STAGE} (reused)", "2.0", "10", "9", "5.0", "1.00", f"{PAYLOADS[1]} 10"]
    tags = _tags(page).tags
    assert not [(t, a) for t, a in tags if any(k.startswith("on") for k in a)] and len([t for t, _ in tags if t == "script"]) == 2
    line = stage_table(figures)[1]
    assert "\x1b" not in line and line.startswith(f"  <script>{TITLE}</script>\\x1b[2J (reused)")


def test_an_output_without_a_manifest_is_refused(tmp_path, capsys):
    (tmp_path / "curated").mkdir()
    assert cli(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--samples", "-5"], "--samples must be 0 or more, not -5"),
    (["--per-reason", "-1"], "--per-reason must be 0 or more, not -1"),
    (["--top-hosts", "-1"], "--top-hosts must be 0 or more, not -1"),
    (["--html", "{tmp}/nodir/x.html"], "--html {tmp}/nodir/x.html: the folder {tmp}/nodir does not exist"),
    (["--html", "{tmp}"], "--html {tmp} is a folder: name a file"),
    (["--html", "{tmp}/a file/x.html"], "--html {tmp}/a file/x.html: {tmp}/a file is not a folder"),
])
def test_bad_counts_and_html_paths_are_refused_in_one_line_before_spark(out, tmp_path, capsys, no_spark,
                                                                         args, message):
    (tmp_path / "a file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli(["inspect", str(out), *args]) == 2
    assert capsys.readouterr().err == f"capfilt: error: {message.replace('{tmp}', str(tmp_path))}\n"


def test_html_never_replaces_the_manifest_a_stage_file_the_input_or_a_model(out, tmp_path, capsys, no_spark):
    """--html writes one file: never inside OUT (its manifest, a stage folder, a new name there),
    inside another capfilt output, at or inside OUT's input, nor over any file that is not an earlier
    report (a model's config); a link to any of them is the same. One line, before Spark, untouched."""
    source, other = tmp_path / "out", tmp_path / "other"
    shutil.copytree(out, source)
    shutil.copytree(out, other)
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "metadata.parquet").write_bytes(b"the input")
    download = source / "stages" / "download" / "manifest.json"
    download.write_text(json.dumps({**json.loads(download.read_text()), "input": {"path": str(dump)}}))
    model = tmp_path / "models" / "open_clip_config.json"
    model.parent.mkdir()
    model.write_text('{"model_cfg": {}}')
    (tmp_path / "link").symlink_to(source / "manifest.json")
    refused = [(source / "manifest.json", "is inside the output"), (source / "report.html", "is inside the output"),
               (source / "stages" / "dedup" / "manifest.json", "is inside the output"),
               (tmp_path / "link", "is inside the output"),
               (other / "stages" / "filter" / "r.html", f"is inside the capfilt output {other / 'stages' / 'filter'}"),
               (dump / "metadata.parquet", "is the input"), (dump / "report.html", "is the input"),
               (model, "exists and is not a capfilt report: name a new file")]
    before = {p: p.read_bytes() for p in (source / "manifest.json", download, dump / "metadata.parquet", model)}
    for page, message in refused:
        assert cli(["inspect", str(source), "--html", str(page)]) == 2, page
        err = capsys.readouterr().err
        assert err.startswith(f"capfilt: error: --html {page} ") and message in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in before} == before
    assert not (source / "report.html").exists() and not (dump / "report.html").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no lock left


def test_an_out_whose_stage_was_replaced_after_the_write_is_refused_naming_the_fix(out, tmp_path, capsys, no_spark):
    """A stage committed again after OUT/curated was written (here its manifest edited by hand; a stage
    command does the same, tests/test_curate.py) makes OUT stale: inspect and export refuse it in one
    line that names the curate command that rebuilds it, before Spark."""
    source = tmp_path / "out"
    shutil.copytree(out, source)
    dedup = source / "stages" / "dedup" / "manifest.json"
    dedup.write_text(json.dumps({**json.loads(dedup.read_text()), "finished_at": "2026-02-02T00:00:00Z"}))
    for argv in (["inspect", str(source)], ["export", str(source), "--format", "json", "--to", str(tmp_path / "j")]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"capfilt: error: {source} is stale: stages/dedup changed after its curated rows were "
                              f"written") and f"rerun `capfilt curate --input INPUT --output {source}`" in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "j").exists() and not [p for p in tmp_path.rglob(".*")]


@pytest.mark.slow
def test_zero_gallery_samples_and_an_html_page_in_an_existing_folder(out, report, tmp_path, capsys):
    page = tmp_path / "report.html"
    page.write_text(render(report), encoding="utf-8")  # an earlier report: --html replaces it
    assert cli(["inspect", str(out), "--samples", "0", "--per-reason", "0", "--html", str(page)]) == 0
    assert "class=\"card" not in page.read_text(encoding="utf-8")
    assert f"report: {page}" in capsys.readouterr().out


def test_rejects_that_disagree_with_the_manifest_are_refused(spark, out, tmp_path):
    changed = tmp_path / "out"
    shutil.copytree(out, changed)
    part = next((changed / "rejects").glob("*.parquet"))
    pq.write_table(pq.read_table(part).slice(1), part)
    with pytest.raises(ReportMismatch, match="rejects holds"):
        build(spark, str(changed))


def test_curated_files_that_disagree_with_the_manifest_are_refused(spark, out, tmp_path):
    changed = tmp_path / "out"
    shutil.copytree(out, changed)
    (changed / "curated" / "part-00001.zstd.parquet").unlink()
    with pytest.raises(ReportMismatch, match="13 rows"):
        build(spark, str(changed))


@pytest.mark.slow
def test_the_gallery_is_a_bounded_deterministic_sample_of_every_reason(spark, out, report):
    small = gallery(spark, str(out), kept=5, per_reason=1)
    assert sum(i["kept"] for i in small) == 5
    dropped = [(i["stage"], i["reason"]) for i in small if not i["kept"]]
    assert sorted(dropped) == sorted((s, r) for s, by in _expected_rejected().items() for r in by)
    assert [i["uid"] for i in small] == [i["uid"] for i in gallery(spark, str(out), kept=5, per_reason=1)]
    full = {i["uid"]: i for i in report["gallery"]}
    assert len([i for i in report["gallery"] if i["kept"]]) == 24  # the default bound, of 26
    for item in report["gallery"]:
        if item["stage"] == "download":
            assert item["thumbnail"] is None  # nothing was downloaded
        else:
            thumb = Image.open(io.BytesIO(base64.b64decode(item["thumbnail"].split(",", 1)[1])))
            assert max(thumb.size) <= 96
    dedup = next(i for i in full.values() if i["reason"] == "near_duplicate_image")
    assert dedup["duplicate_of"] == "u020" and any(c["score"] is not None for c in dedup["candidates"])
    unscored = next(i for i in full.values() if i["reason"] == "no_aligned_caption")
    assert [c["source"] for c in unscored["candidates"]][:2] == ["web", "synthetic"]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.title, self._in_title = [], "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _tags(page):
    parser = _Tags()
    parser.feed(page)
    return parser


def test_the_page_escapes_everything_and_loads_nothing_from_outside(report):
    page = render(report)
    for payload in PAYLOADS + URLS[2:4] + [HOSTILE_REASON]:
        assert payload not in page, payload
    parsed = _tags(page)
    tags = parsed.tags
    assert not [t for t, a in tags if t in ("iframe", "svg") and "onload" in a or t in ("link", "object", "embed", "iframe", "base", "form")]
    assert not [(t, a) for t, a in tags if any(k.startswith("on") for k in a)], "an event handler attribute"
    assert not [t for t, a in tags if t == "b" and a.get("id") == "pwned"]
    assert all(a["src"].startswith("data:image/") for t, a in tags if "src" in a)
    hrefs = [(t, a["href"]) for t, a in tags if "href" in a]
    assert hrefs and all(t == "a" and re.match(r"https?://", h) for t, h in hrefs), hrefs
    assert "url(" not in page and "@import" not in page and "srcset" not in page
    scripts = [a for t, a in tags if t == "script"]
    csp = next(a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and "img-src data:" in csp and "'unsafe-inline'" not in csp.split("script-src")[1]
    assert scripts == [{"type": "application/json", "id": "reasons"}, {"nonce": nonce}]
    island = page.split('<script type="application/json" id="reasons">')[1].split("</script>")[0]
    assert HOSTILE_REASON in [r["reason"] for r in json.loads(island)]


def test_json_for_a_script_element_cannot_end_it():
    text = script_json({"a": "</script><!--\u2028\u2029&"})
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == {"a": "</script><!--\u2028\u2029&"}


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed when missing (CI runs as root with the package mirror)."""
    found = shutil.which("chromium")
    if found is None:
        try:
            install = subprocess.run("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                                     "--no-install-recommends chromium", shell=True, capture_output=True,
                                     text=True, timeout=1200)
            log = f"{install.stdout[-1500:]}{install.stderr[-1500:]}"
        except subprocess.TimeoutExpired as e:
            log = f"timed out after {e.timeout} s"
        found = shutil.which("chromium")
        if found is None:
            pytest.fail("the HTML report tests need headless Chromium and it could not be installed with "
                        "`apt-get install -y --no-install-recommends chromium` (needs root and a Debian "
                        f"package mirror):\n{log}")
    return found


def _chromium(binary, *args):
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                               *args], capture_output=True, text=True, timeout=120)


def _ran_payload(dom: str) -> list[str]:
    """The marks a payload would leave in the live DOM."""
    parsed = _tags(dom)
    marks = [f"title {parsed.title!r}"] if "PWNED" in parsed.title else []
    return marks + [f"<{t}> with {a}" for t, a in parsed.tags if a.get("id") == "pwned" or "data-pwned" in a]


def test_the_payload_detector_sees_a_payload_that_runs(chromium, tmp_path):
    """Without escaping and CSP the same payloads do run, and _ran_payload sees it: the check below can fail."""
    page = tmp_path / "unsafe.html"
    page.write_text(f"<!doctype html><title>t</title><body>{PAYLOADS[0]}{PAYLOADS[3]}</body>", encoding="utf-8")
    marks = _ran_payload(_chromium(chromium, "--dump-dom", page.as_uri()).stdout)
    assert len(marks) == 2, marks


@pytest.mark.slow
def test_headless_chromium_shows_the_report_and_runs_no_payload(report, chromium, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(report), encoding="utf-8")
    result = _chromium(chromium, "--dump-dom", page.as_uri())
    dom = result.stdout
    options = len({i["reason"] for i in report["gallery"]})
    # The page's own script ran (it fills the filter and marks <body>), so scripts were on.
    assert f'data-report-ready="{options}"' in dom, "the page's script did not run: the check below would be vacuous"
    assert _ran_payload(dom) == []
    assert dom.count('class="card') == len(report["gallery"]) and 'id="gallery"' in dom
    assert "of 26)" in dom  # the filter's label for kept rows: sampled of total
    shot = tmp_path / "report.png"
    _chromium(chromium, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, "a blank screenshot"
    assert (image.std(axis=(0, 1)) > 10).all()


# The download failure map. A crawl of 42 rows over seven hosts, with the download outcomes below; every
# row that is downloaded goes on to be curated. `OK2.example` keeps userinfo in its URLs and fails with
# details written before codes were recorded; the hostile host has markup (and an escape sequence) in
# the host part of its URL, none of `/?#`, so all of it is the host.
HOSTILE_HOST = f"<img src=x onerror=\"{TITLE}\">\x1b[2J.evil"
HOSTILE_DETAIL = f"<script>{TITLE}</script>: not a code"
NOT_FOUND, NO_DNS = "http_404: HTTP Error 404: Not Found", "dns: cannot resolve nxdomain.example"
TIMEOUT, RATE_LIMITED = "timeout: timed out", "http_429: HTTP Error 429: Too Many Requests"
FAILED = "failed_to_download"
CRAWL = [  # (scheme://authority, rows downloaded, (reason, detail) of each failed fetch)
    ("http://dead.example", 0, [(FAILED, NOT_FOUND)] * 6),
    ("https://nxdomain.example", 0, [(FAILED, NO_DNS)] * 3),
    ("http://Slow.Example:8080", 5, [(FAILED, TIMEOUT)] * 3),
    ("http://busy.example", 2, [(FAILED, RATE_LIMITED)] * 3 + [(FAILED, "http_503: HTTP Error 503: Service Unavailable")]),
    ("http://ok1.example", 6, []),
    ("http://user:secret@OK2.example", 4, [(FAILED, "HTTP Error 500: Internal Server Error")] * 2
     + [("too_small", "too_small: 12x12 is below download.min_image_size")]),
    (f"http://{HOSTILE_HOST}", 0, [(FAILED, f"http_403: {PAYLOADS[0]}"), ("failed_to_decode", HOSTILE_DETAIL)]),
]
# Never fetched: left out of every figure but the outcome table's "not fetched" lines.
PRECHECK = [("http://dead.example/empty.jpg", "empty_caption", "blank caption"),
            ("http://busy.example/again.jpg", "duplicate_uid", None),
            ("javascript:alert(1)", "invalid_url", "not an http(s) URL"),
            (None, "malformed_row", "unparseable line: {\"url\": ")]


@pytest.fixture(scope="module")
def crawl_out(tmp_path_factory):
    rows, fates = _rows(42), {}
    plan = [(f"{origin}/img/{k}.jpg", fate) for origin, ok, failures in CRAWL
            for k, fate in enumerate([None] * ok + [("download", *f) for f in failures])]
    plan += [(url, ("download", reason, detail)) for url, reason, detail in PRECHECK]
    assert len(plan) == len(rows)
    for row, (url, fate) in zip(rows, plan):
        row["url"] = url
        if fate:
            fates[row["key"]] = fate
    return _make_out(tmp_path_factory.mktemp("crawl") / "out", rows, fates)


@pytest.fixture(scope="module")
def crawl_report(spark, crawl_out):
    return build(spark, str(crawl_out), kept=2, per_reason=1)


WORST_HOSTS = [  # host, fetched, failed, success rate, top reason, top code (a tie goes to the first by name)
    ("dead.example", 6, 6, 0.0, FAILED, "http_404"),
    ("busy.example", 6, 4, 2 / 6, FAILED, "http_429"),
    ("nxdomain.example", 3, 3, 0.0, FAILED, "dns"),
    ("ok2.example", 7, 3, 4 / 7, FAILED, "-"),
    ("slow.example:8080", 8, 3, 5 / 8, FAILED, "timeout"),
    (HOSTILE_HOST.lower(), 2, 2, 0.0, "failed_to_decode", "-"),
]


@pytest.mark.slow
def test_the_failure_map_counts_fetched_rows_by_outcome_code_status_and_host(crawl_report):
    f = crawl_report["sections"]["download_failures"]
    assert (f["fetched"], f["downloaded"], f["failed"], f["not_fetched"]) == (38, 17, 21, 4)
    assert [(o["outcome"], o["rows"], o["share"]) for o in f["outcomes"]] == [
        ("downloaded", 17, 17 / 38), (FAILED, 19, 19 / 38), ("failed_to_decode", 1, 1 / 38), ("too_small", 1, 1 / 38),
        ("duplicate_uid", 1, None), ("empty_caption", 1, None), ("invalid_url", 1, None), ("malformed_row", 1, None)]
    assert [(c["code"], c["rows"]) for c in f["codes"]] == [  # "-": the details without a code
        ("http_404", 6), ("-", 3), ("dns", 3), ("http_429", 3), ("timeout", 3), ("http_403", 1), ("http_503", 1),
        ("too_small", 1)]
    assert f["other_codes"] is None
    assert [(s["status"], s["rows"]) for s in f["statuses"]] == [(403, 1), (404, 6), (429, 3), (503, 1)]
    assert [tuple(h.values()) for h in f["hosts"]] == WORST_HOSTS
    assert (f["host_count"], f["failing_hosts"]) == (7, 6)  # ok1.example never failed


@pytest.mark.slow
def test_the_failure_map_keeps_the_hosts_with_the_most_failures(spark, crawl_out):
    from capfilt.pipelines.download_report import download_failures, failure_map
    assert [h["host"] for h in download_failures(spark, str(crawl_out), top_hosts=2)["hosts"]] == [
        "dead.example", "busy.example"]
    assert download_failures(spark, str(crawl_out), top_hosts=0)["hosts"] == []
    long = {"host": "a" * 500 + ".example", "fetched": 1, "failed": 1, "success_rate": 0.0, "reason": FAILED, "code": "dns"}
    f = {**download_failures(spark, str(crawl_out), top_hosts=1), "hosts": [long]}
    assert ["a" * 79 + "\u2026", "1", "1", "0.0%", FAILED, "dns"] in [_cells(line) for line in failure_map(f)]


def test_the_host_keeps_its_port_drops_userinfo_and_is_no_host_for_a_malformed_url(spark):
    from capfilt.pipelines.download_report import host_of
    urls = {"http://User:pw@Ex.COM:8000/a.jpg": "ex.com:8000", "http://127.0.0.2:8000": "127.0.0.2:8000",
            "https://[::1]:443/x?y": "[::1]:443", "HTTPS://a.example?q=1": "a.example", "http://b.example#f": "b.example",
            "http://a@b@c.example/": "c.example", "not a url": "(no host)", "http:///path": "(no host)",
            "//c.example/x": "(no host)", "": "(no host)", None: "(no host)"}
    df = spark.createDataFrame([(u,) for u in urls], "url string")
    assert {r["url"]: r["host"] for r in df.select("url", host_of(df["url"]).alias("host")).collect()} == urls


@pytest.mark.slow
def test_the_text_report_prints_the_failure_map(crawl_out, capsys):
    assert cli(["inspect", str(crawl_out), "--samples", "0", "--per-reason", "0"]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text
    lines = text.split("download failures: ", 1)[1].splitlines()
    assert lines[0] == "21 of 38 fetched rows failed (55.3%); 4 rows never fetched (precheck)"
    cells = [_cells(line) for line in lines]
    for row in (["downloaded", "17", "44.7%"], [FAILED, "19", "50.0%"], ["invalid_url", "1", "not fetched"],
                ["http_404", "6"], ["-", "3"], ["429", "3"], ["503", "1"]):
        assert row in cells, row
    hosts = cells[cells.index(["host", "fetched", "failed", "success", "top reason", "top code"]) + 1:][:len(WORST_HOSTS)]
    shown = HOSTILE_HOST.lower().replace("\x1b", "\\x1b")
    assert hosts == [[shown if h == HOSTILE_HOST.lower() else h, str(n), str(k), f"{rate:.1%}", reason, code]
                     for h, n, k, rate, reason, code in WORST_HOSTS]
    assert lines[-1] == "  (6 of 6 hosts with failures shown, most failures first; 7 hosts fetched from)"


def _failure_tables(page):
    """The cells of the failure map's tables as text, header first, one list per table."""
    section = page.split("<h2>Download failures</h2>", 1)[1].split("<h2>", 1)[0]
    return [[[html.unescape(re.sub(r"<[^>]*>", "", cell)) for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table)] for table in re.findall(r"<table[^>]*>(.*?)</table>", section)]


def test_the_page_shows_the_failure_map_with_hostile_hosts_and_details_as_text(crawl_report):
    page = render(crawl_report)
    for raw in (HOSTILE_HOST, HOSTILE_HOST.lower(), PAYLOADS[0], "<script>" + TITLE.lower(), "<img src=x"):
        assert raw not in page, raw
    outcomes, codes, statuses, hosts = _failure_tables(page)
    assert outcomes[:3] == [["outcome", "rows", "of fetched"], ["downloaded", "17", "44.7%"], [FAILED, "19", "50.0%"]]
    assert codes[:3] == [["code", "rows"], ["http_404", "6"], ["-", "3"]]
    assert statuses == [["HTTP status", "rows"], ["403", "1"], ["404", "6"], ["429", "3"], ["503", "1"]]
    assert hosts[1:] == [[h, str(n), str(k), f"{rate:.1%}", reason, code] for h, n, k, rate, reason, code in WORST_HOSTS]
    section = page.split("<h2>Download failures</h2>", 1)[1].split("<h2>", 1)[0]
    assert {t for t, _ in _tags(section).tags} == {"p", "div", "table", "tr", "th", "td", "code"}


def test_the_failure_map_is_omitted_in_one_line_without_the_download_output(out, tmp_path, capsys):
    gone = tmp_path / "out"
    shutil.copytree(out, gone)
    shutil.rmtree(gone / "stages" / "download")
    page = tmp_path / "report.html"
    assert cli(["inspect", str(gone), "--samples", "0", "--per-reason", "0", "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert f"download failures: omitted, {gone}/stages/download/data is not there\n" in text
    assert "<h2>Download failures</h2><p>Omitted: " in page.read_text(encoding="utf-8")


def test_a_download_that_fetched_nothing_is_all_failures(spark, crawl_out, tmp_path):
    """No data file at all (Spark writes none for no rows): the stage manifest's 0 rows out says why."""
    from capfilt.pipelines.download_report import download_failures
    none = tmp_path / "out"
    shutil.copytree(crawl_out, none)
    shutil.rmtree(none / "stages" / "download" / "data")
    (none / "stages" / "download" / "data").mkdir()
    manifest = none / "stages" / "download" / "manifest.json"
    assert download_failures(spark, str(none)) is None  # the manifest says rows were written: they are gone
    stage = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**stage, "counts": {**stage["counts"], "output": 0}}))
    f = download_failures(spark, str(none))
    assert (f["fetched"], f["downloaded"], f["failed"]) == (21, 0, 21) and f["outcomes"][0] == {
        "outcome": "downloaded", "rows": 0, "share": 0.0}


def test_only_an_earlier_report_counts_as_one_to_replace(tmp_path):
    from capfilt.jobs.report import is_report
    page = tmp_path / "r.html"
    page.write_text("<!doctype html><html><head><title>capfilt report: out</title>")
    other = tmp_path / "notes.html"
    other.write_text("<!doctype html><title>my notes</title>")
    assert is_report(page) and not is_report(other) and not is_report(tmp_path) and not is_report(tmp_path / "none")
