"""A stage from outside capfilt: defined in this test, registered the way a package registers one (an
entry point of the group `capfilt.stages` in an installed distribution's metadata: here a dist-info
folder on sys.path, as pip would leave it), run by `capfilt curate` in the chain. No package file knows it."""
from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from capfilt.jobs.cli import main as cli
from capfilt.pipelines.output import read_manifest
from capfilt.pipelines.registry import stages

PLUGIN = '''
"""An OCR-text-like filter as a third party writes it: rows whose web caption is longer than a limit leave."""
from dataclasses import dataclass, field

from capfilt.pipelines.stage import Result, Section, Stage, reject_rows
from capfilt.schemas import SCORED


@dataclass
class Settings:
    max_chars: int = field(default=60, metadata={"help": "longest web caption kept", "min": 1})


def split(rows, cfg, context):
    from pyspark.sql import functions as F
    limit = cfg.long_captions.max_chars
    long = F.length("caption") > limit
    dropped = rows.filter(long)
    return Result(rows.filter(~long), reject_rows(dropped, "long_captions", "caption_too_long",
                                                  F.concat(F.length("caption").cast("string"), F.lit(f" > {limit}"))),
                  {"limit": limit})


def longest(spark, root, top):
    from pyspark.sql import functions as F
    return {"chars": spark.read.parquet(f"{root}/curated").agg(F.max(F.length("caption"))).first()[0]}


STAGE = Stage(name="long_captions", reads=SCORED, adds=(), split=split, settings=Settings, after="filter",
              reasons={"caption_too_long": "the web caption is longer than long_captions.max_chars"},
              help="drop rows whose web caption is too long",
              inspect=(Section("longest_caption", "Longest web caption", longest,
                               lambda figures, root: [f"longest curated web caption: {figures['chars']} chars"],
                               lambda figures, root: f"<p>{figures['chars']} chars</p>"),))
'''


def _install(tmp_path, monkeypatch, source: str) -> None:
    """A module and a distribution's metadata naming its STAGE as a capfilt stage, on sys.path."""
    site = tmp_path / "site"
    (site / "capfilt_long_captions-0.1.dist-info").mkdir(parents=True)
    (site / "capfilt_long_captions.py").write_text(textwrap.dedent(source))
    (site / "capfilt_long_captions-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: capfilt-long-captions\nVersion: 0.1\n")
    (site / "capfilt_long_captions-0.1.dist-info" / "entry_points.txt").write_text(
        "[capfilt.stages]\nlong_captions = capfilt_long_captions:STAGE\n")
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import system's caches
    monkeypatch.delitem(sys.modules, "capfilt_long_captions", raising=False)  # another test's version
    stages.cache_clear()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The stage installed."""
    _install(tmp_path, monkeypatch, PLUGIN)
    yield
    stages.cache_clear()


@pytest.mark.parametrize("change, says", [
    (('name="long_captions"', 'name="../../etc"'), "lower-case letters"),
    (('name="long_captions"', 'name="spark"'), "a config section capfilt already has"),
    (('name="long_captions"', 'name="dedup"'), "a stage or a config section"),
    (('name="long_captions"', 'name="inspect"'), "the name of a capfilt command"),
    (('after="filter"', 'after="nowhere"'), "must name the stage it runs after"),
    (("STAGE = Stage(", "import no_such_module\nSTAGE = Stage("), "does not load: ModuleNotFoundError"),
    (("STAGE = Stage(", "STAGE = 'a stage'\nNOT = Stage("), "not a capfilt Stage"),
    (('Section("longest_caption"', 'Section("download_failures"'), "is used by another section"),
    (("inspect=(Section(", 'inspect=("a page", Section('), "must be a tuple of capfilt Sections"),
])
def test_a_broken_or_clashing_added_stage_is_one_line_naming_it(tmp_path, monkeypatch, capsys, no_spark, change,
                                                                 says):
    _install(tmp_path, monkeypatch, PLUGIN.replace(*change))
    try:
        assert cli(["--help"]) == 2
        assert cli(["curate", "--input", "x", "--output", str(tmp_path / "out")]) == 2
    finally:
        stages.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(says in line and line.startswith("capfilt: error:") for line in err), err
    assert not (tmp_path / "out").exists()


def test_the_stage_command_refuses_the_download_which_has_its_own(capsys, no_spark):
    from capfilt.jobs.common import run
    from capfilt.jobs.stage import main
    assert run(main, ["download", "--input", "dump.parquet", "--output", "x"]) == 2
    assert "capfilt download --help" in capsys.readouterr().err


def _rejected(out, limit: int):
    import pyarrow.dataset as ds
    rejects = ds.dataset(out / "rejects").to_table().to_pandas()
    mine = rejects[rejects.stage == "long_captions"]
    assert set(mine.reason) <= {"caption_too_long"}
    assert all(len(c) > limit for c in mine.caption)
    curated = ds.dataset(out / "curated").to_table(columns=["caption"]).to_pandas()
    assert all(len(c) <= limit for c in curated.caption)
    return len(mine)


@pytest.mark.slow
def test_a_stage_defined_outside_the_package_runs_resumes_reports_and_goes_stale(
        plugin, curated_out, curate_args, tmp_path, capsys):
    assert [s.name for s in stages()][:4] == ["download", "caption", "filter", "long_captions"]
    assert cli(["config", "--keys"]) == 0
    assert "long_captions.max_chars = 60" in capsys.readouterr().out
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    args = ["curate", *curate_args, "--output", str(out)]
    assert cli([*args, "--set", "long_captions.max_chars=40"]) == 0
    log = capsys.readouterr().out
    assert "stage 4/5: long_captions" in log and log.count("committed by an earlier run, reused") == 3
    first = _rejected(out, 40)
    assert first > 0
    manifest = read_manifest(out)
    assert list(manifest["stages"])[3] == "long_captions"
    assert manifest["counts"]["rejected"]["long_captions"] == {"caption_too_long": first}
    assert manifest["counts"]["input"] == manifest["counts"]["output"] + manifest["counts"]["rejected_total"]
    assert manifest["models"]["long_captions"] == {"limit": 40}

    # inspect reports it: its step in the funnel, its reason with the meaning it declared, its own section.
    page = tmp_path / "report.html"
    assert cli(["inspect", str(out), "--html", str(page)]) == 0
    report = capsys.readouterr().out
    assert "long_captions" in report and "caption_too_long" in report
    chars = int(report.split("longest curated web caption: ", 1)[1].split(" chars", 1)[0])
    assert 0 < chars <= 40
    assert f"<h2>Longest web caption</h2><p>{chars} chars</p>" in page.read_text(encoding="utf-8")

    # Killed while it was writing: no manifest there, none for OUT; the rerun reuses the rest, ends the same.
    shutil.rmtree(out / "stages" / "long_captions")
    (out / "manifest.json").unlink()
    assert cli([*args, "--set", "long_captions.max_chars=40"]) == 0
    log = capsys.readouterr().out
    assert log.count("committed by an earlier run, reused") == 3
    assert read_manifest(out)["counts"] == manifest["counts"]

    # Its own setting makes its committed output stale: recomputed (it has no model), the rest reused.
    assert cli([*args, "--set", "long_captions.max_chars=80"]) == 0
    log = capsys.readouterr().out
    assert "stage 4/5: long_captions" in log and "recomputed from the stored scores, no model loaded" in log
    assert _rejected(out, 80) < first

    # And its command runs it alone, from the committed filter stage.
    assert cli(["long_captions", "--input", str(out / "stages" / "filter"), "--output", str(tmp_path / "alone"),
                "--set", "long_captions.max_chars=40"]) == 0
    assert read_manifest(tmp_path / "alone")["counts"]["rejected"]["long_captions"]["caption_too_long"] == first
