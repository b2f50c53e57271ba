"""`capfilt inspect`: the funnel and scores agree with the data, and the HTML report shows hostile
captions and URLs as text in headless Chromium, never running them."""
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main as cli
from pipelines.report import QUANTILES, ReportMismatch, build
from pipelines.report_html import render

# Each payload, if it ever ran, would mark the page: the test looks for the mark in the live DOM.
MARK = "document.body.setAttribute('data-pwned','1')"
PAYLOADS = [f"<script>{MARK}</script>", f"<img src=x onerror=\"{MARK}\">", f"\"><svg onload=\"{MARK}\">",
            f"</script><script>{MARK}</script>", f"' onmouseover='{MARK}' x='", f"<iframe srcdoc=\"<script>{MARK}</script>\">"]
URLS = [f"javascript:{MARK}", f"http://127.0.0.1/\"><script>{MARK}</script>", f"data:text/html,<script>{MARK}</script>"]


def _rewrite(folder, column, values):
    for i, path in enumerate(sorted(folder.glob("*.parquet"))):
        table = pq.read_table(path)
        data = table.column(column).to_pylist()
        for j in range(min(len(values), len(data))):
            data[j] = values[(i + j) % len(values)]
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(data, pa.string()))
        pq.write_table(table, path, compression="zstd")
        path.with_name(f".{path.name}.crc").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def hostile_out(curated_out, tmp_path_factory):
    """The test corpus's curated output with script payloads in captions, URLs and details, curated
    and rejected rows alike."""
    root = tmp_path_factory.mktemp("inspect") / "out"
    shutil.copytree(curated_out, root)
    _rewrite(root / "curated", "caption", PAYLOADS)
    _rewrite(root / "curated", "caption_primary", PAYLOADS[::-1])
    _rewrite(root / "curated", "url", URLS)
    _rewrite(root / "rejects", "caption", PAYLOADS)
    _rewrite(root / "rejects", "detail", PAYLOADS[2:] + PAYLOADS[:2])
    return root


@pytest.fixture(scope="module")
def report(spark, hostile_out):
    return build(spark, str(hostile_out))


def test_the_funnel_and_scores_agree_with_the_files(report, hostile_out):
    manifest = json.loads((hostile_out / "manifest.json").read_text())
    funnel = report["funnel"]
    assert funnel["after"][0] == ("input", manifest["counts"]["input"])
    assert funnel["after"][-1] == ("dedup", manifest["counts"]["output"])
    assert funnel["rejected"] == manifest["counts"]["rejected"]
    candidates = pq.read_table(hostile_out / "curated", columns=["candidates"]).column("candidates").to_pylist()
    flat = [c for row in candidates for c in row if c["score"] is not None]
    for source in ("web", "synthetic"):
        scores = np.array([c["score"] for c in flat if c["source"] == source], dtype=np.float64)
        got = report["scores"]["sources"][source]
        assert got["n"] == len(scores)
        assert np.allclose(list(got["quantiles"].values()), np.quantile(scores, QUANTILES), atol=1e-6)
        assert got["kept_fraction"] == pytest.approx(np.mean([c["kept"] for c in flat if c["source"] == source]))
        assert sum(got["histogram"]) == len(scores)
    assert sum(s["rows"] for s in report["shards"]) == manifest["counts"]["output"]
    reasons = {i["reason"] for i in report["gallery"] if not i["kept"]}
    assert reasons == {r for by_stage in manifest["counts"]["rejected"].values() for r in by_stage}


def test_the_text_report_prints_the_funnel(hostile_out, capsys):
    assert cli(["inspect", str(hostile_out)]) == 0
    text = capsys.readouterr().out
    manifest = json.loads((hostile_out / "manifest.json").read_text())
    assert f"{manifest['counts']['input']} rows in, {manifest['counts']['output']} curated" in text
    for reasons in manifest["counts"]["rejected"].values():
        for reason, n in reasons.items():
            assert any(line.split()[-2:] == [reason, str(n)] for line in text.splitlines()), reason


def test_a_changed_rejects_table_is_refused(spark, hostile_out, tmp_path):
    changed = tmp_path / "out"
    shutil.copytree(hostile_out, changed)
    part = sorted((changed / "rejects").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(1), part)
    part.with_name(f".{part.name}.crc").unlink(missing_ok=True)
    with pytest.raises(ReportMismatch):
        build(spark, str(changed))


def test_the_page_escapes_everything_and_loads_nothing_from_outside(report):
    page = render(report)
    for payload in PAYLOADS:
        assert payload not in page
    assert "<script>" not in page.replace("<script nonce=", "")  # only the page's own script
    assert 'href="javascript:' not in page and 'href="data:' not in page
    assert ' src="http' not in page and "url(" not in page and "@import" not in page
    assert "Content-Security-Policy" in page


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed when missing (the test setup needs root and the package mirror)."""
    found = shutil.which("chromium")
    if found is None:
        install = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                                 "--no-install-recommends chromium", shell=True, capture_output=True, text=True,
                                 timeout=900)
        found = shutil.which("chromium")
        assert found, f"could not install chromium for the report test:\n{install.stdout[-1500:]}{install.stderr[-1500:]}"
    return found


def _chromium(binary, *args):
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={profile}", "--virtual-time-budget=3000", *args],
                              capture_output=True, text=True, timeout=120)


def test_headless_chromium_shows_the_report_and_runs_no_payload(report, chromium, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(report), encoding="utf-8")
    dom = _chromium(chromium, "--dump-dom", page.as_uri()).stdout
    assert 'data-report-ready="1"' in dom, "the page's own script did not run, so the check below would be vacuous"
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert 'class="card' in dom and "samples" in dom
    shot = tmp_path / "report.png"
    _chromium(chromium, f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1800, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, "a blank screenshot"
    assert os.path.getsize(shot) > 20_000
