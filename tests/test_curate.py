"""`capfilt curate`: the whole chain in one job, its output layout, conservation and resuming."""
import collections
import json
import shutil

import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli
from jobs.curate import main as curate
from pipelines.output import ConservationError, read_manifest
from pipelines.publish import STAGES, publish
from schemas import CURATED, REJECTS


def _table(path):
    return pq.read_table(path)  # a folder of Parquet files (Spark's _SUCCESS is skipped)


def test_every_input_row_is_curated_or_rejected_with_its_stage_and_reason(curated_out, curate_site):
    manifest = read_manifest(curated_out)
    curated, rejects = _table(curated_out / "curated"), _table(curated_out / "rejects")
    CURATED.validate(curated.schema, where="OUT/curated")
    REJECTS.validate(rejects.schema, where="OUT/rejects")
    inputs = pq.read_table(curate_site[2]).column("id").to_pylist()
    ended = curated.column("uid").to_pylist() + rejects.column("uid").to_pylist()
    assert collections.Counter(ended) == collections.Counter(inputs)  # each row exactly once
    counts = manifest["counts"]
    assert counts["input"] == len(inputs) == counts["output"] + counts["rejected_total"]
    assert counts["output"] == curated.num_rows
    by_reason = collections.Counter(zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist()))
    assert {(s, r): n for s, reasons in counts["rejected"].items() for r, n in reasons.items()} == dict(by_reason)
    assert {"download", "dedup"} <= set(counts["rejected"])  # the corpus has faults and planted copies
    assert list(manifest["stages"]) == list(STAGES)
    assert manifest["models"]["caption"]["captioner"].endswith("shapes-captioner")
    assert sum(f["bytes"] for f in manifest["curated_files"]) > 0
    assert all(f["file"].endswith(".zstd.parquet") for f in manifest["curated_files"])


def test_a_rerun_reuses_committed_stages_and_a_killed_stage_resumes(curated_out, curate_args, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    # As if the run was killed during dedup: its output is not committed, the earlier ones are.
    shutil.rmtree(out / "stages" / "dedup")
    (out / "manifest.json").unlink()
    assert curate([*curate_args, "--output", str(out)]) == 0
    log = capsys.readouterr().out
    for stage in ("download", "caption", "filter"):
        assert f"stage {STAGES.index(stage) + 1}/4: {stage}" in log
    assert log.count("committed by an earlier run, reused") == 3
    assert read_manifest(out)["counts"] == read_manifest(curated_out)["counts"]


def test_other_settings_than_the_committed_stages_used_are_refused(curated_out, curate_args, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    rc = cli(["curate", *curate_args, "--output", str(out), "--set", "filter.rule=topk"])
    assert rc == 2
    assert "filter under" in capsys.readouterr().err


@pytest.mark.parametrize("corruption", ["lost_reject_rows", "manifest_count"])
def test_the_job_fails_loudly_when_counts_do_not_add_up(curated_out, tmp_path, spark, corruption):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    if corruption == "lost_reject_rows":
        stage_rejects = out / "stages" / "download" / "rejects"
        for part in stage_rejects.glob("*.parquet"):
            table = pq.read_table(part)
            pq.write_table(table.slice(1), part)  # one rejected row silently lost
            part.with_name(f".{part.name}.crc").unlink(missing_ok=True)  # Hadoop would refuse the file
    else:
        path = out / "stages" / "download" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["counts"]["input"] += 3
        path.write_text(json.dumps(manifest))
    before = sorted(p.name for p in (out / "curated").iterdir())
    with pytest.raises(ConservationError, match="unaccounted for"):
        publish(spark, str(out), {})
    assert not (out / "manifest.json").exists()  # OUT no longer reads as finished
    assert sorted(p.name for p in (out / "curated").iterdir()) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".publish")]


def test_stage_outputs_from_different_runs_are_refused(curated_out, tmp_path, spark):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    path = out / "stages" / "filter" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["counts"]["input"] -= 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConservationError, match="filter read"):
        publish(spark, str(out), {})
