"""The target-aware image filter (DataComp's image-based filter) in a curate run."""
from __future__ import annotations

import re
import shutil

import pyarrow.parquet as pq
import pytest

from capfilt.jobs.cli import main as cli
from capfilt.jobs.curate import main as curate
from capfilt.pipelines.output import read_manifest
from helpers import shapes_args


def test_a_target_folder_without_images_is_one_line_before_spark(tmp_path, refused_before_spark):
    empty = tmp_path / "target"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    err = refused_before_spark(curate, [*shapes_args(tmp_path), "--output", out, "--set", f"target.sets=[{empty}]"],
                               tmp_path)
    assert "target.sets:" in err and "holds no images" in err and not out.exists()


@pytest.mark.slow
def test_rows_outside_the_targets_clusters_leave_and_the_target_images_own_rows_stay(curated_out, curate_args, tmp_path,
                                                                                      capsys):
    """Target images = copies of three curated rows' images: those rows stay (their image is the target's), the
    rows kept are exactly those in the clusters of the three, the others leave as off_target naming their
    cluster; nothing before filter runs again; a killed rerun is identical; other target images rerun it."""
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    curated = pq.read_table(curated_out / "curated", columns=["uid", "image"]).sort_by("uid").to_pylist()
    target = tmp_path / "target"
    target.mkdir()
    chosen = [curated[i]["uid"] for i in (0, len(curated) // 2, len(curated) - 1)]
    for row in curated:
        if row["uid"] in chosen:
            (target / f"{row['uid']}.jpg").write_bytes(row["image"])
    on = ["--set", f"target.sets=[{target}]", "--set", "target.clusters=6"]
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    log = capsys.readouterr().out
    assert "stage 4/5: target" in log and log.count("committed by an earlier run, reused") == 3
    manifest = read_manifest(out)
    counts = manifest["counts"]
    assert counts["input"] == counts["output"] + counts["rejected_total"]
    report = manifest["models"]["target"]["target"]
    assert report["clusters"] == 6 and report["images"] == 3 and 1 <= report["target_clusters"] <= 3
    stage = pq.read_table(out / "stages" / "target" / "data").to_pylist()
    cluster = {r["uid"]: r["target_cluster"] for r in stage}
    kept_clusters = {cluster[u] for u in chosen}
    assert len(kept_clusters) == report["target_clusters"]
    assert {r["uid"] for r in stage} == {u for u, c in cluster.items() if c in kept_clusters} >= set(chosen)
    rejects = [r for r in pq.read_table(out / "rejects").to_pylist() if r["stage"] == "target"]
    assert rejects and all(r["reason"] == "off_target" and r["detail"].startswith("cluster ") for r in rejects)
    assert cli(["inspect", str(out)]) == 0  # a stage of no run here (balance) adds no section
    text = capsys.readouterr().out
    assert re.search(r"\n  target +\d+\n    - off_target +\d", text) and "concept balance" not in text
    filtered = read_manifest(curated_out / "stages" / "filter")["counts"]["output"]
    assert len(rejects) + len(stage) == filtered  # it read the filter's rows: both rules must pass
    first = pq.read_table(out / "curated").sort_by("uid")
    (out / "stages" / "target" / "manifest.json").unlink()
    (out / "manifest.json").unlink()
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    assert pq.read_table(out / "curated").sort_by("uid").equals(first)
    capsys.readouterr()
    (target / f"{chosen[0]}.jpg").unlink()  # other target images under the same path: target runs again
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("committed by an earlier run, reused") == 3
    assert read_manifest(out)["models"]["target"]["target"]["images"] == 2
