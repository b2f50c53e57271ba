"""`capfilt curate`: the whole chain in one job, its output layout, conservation and resuming."""
import collections
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.jobs.cli import main as cli
from capfilt.jobs.curate import main as curate
from capfilt.pipelines.output import ConservationError, read_manifest
from capfilt.pipelines.publish import publish

STAGES = ("download", "caption", "filter", "dedup")  # the default chain: the optional stages are off
from capfilt.schemas import CURATED, REJECTS

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
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


def test_other_model_settings_than_the_committed_stages_used_are_refused(curated_out, curate_args, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    rc = cli(["curate", *curate_args, "--output", str(out), "--set", "caption.top_p=0.5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "caption under" in err and "caption.top_p" in err


def test_images_are_stored_once_and_decoded_once_per_row(curated_out):
    import pyarrow.dataset as ds
    for stage in ("caption", "filter", "dedup"):  # only what each stage adds
        assert "image" not in ds.dataset(curated_out / "stages" / stage / "data", partitioning="hive").schema.names
    assert "image" in _table(curated_out / "curated").schema.names
    manifest = read_manifest(curated_out)
    rows = manifest["stages"]["caption"]["rows_in"]
    assert rows == manifest["stages"]["download"]["rows_out"] > 0
    # Caption and filter ran in one pass: each image decoded once, both models on it.
    assert manifest["stages"]["caption"]["decoded_images"] == rows
    assert manifest["stages"]["caption"]["model_passes"] == {"captioner": rows, "clip": rows}
    assert manifest["stages"]["filter"]["decoded_images"] == 0
    assert manifest["stages"]["filter"]["model_passes"] == {"clip": 0}
    for stage in STAGES:
        assert manifest["stages"][stage]["bytes_written"] > 0 and manifest["stages"][stage]["seconds"] > 0
    assert manifest["write"]["bytes_written"] > 0


def _own_kept(curated):
    """uid -> [kept] of the row's own candidates (not inherited), and uid -> {text: score}."""
    kept, scores = {}, {}
    for uid, candidates in zip(curated.column("uid").to_pylist(), curated.column("candidates").to_pylist()):
        own = [c for c in candidates if not c["source"].startswith("inherited")]
        kept[uid] = [c["kept"] for c in own]
        scores[uid] = {c["text"]: c["score"] for c in own}
    return kept, scores


@pytest.mark.slow
def test_a_rerun_with_other_selection_settings_reuses_the_scores_and_loads_no_model(
        curated_out, curate_args, clip_link, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    target = clip_link.readlink()
    clip_link.unlink()  # the CLIP reference no longer loads: a rerun that needed it would fail
    try:
        assert curate([*curate_args, "--output", str(out), "--set", "filter.rule=topk", "--set", "filter.top_k=1"]) == 0
    finally:
        clip_link.symlink_to(target, target_is_directory=True)
    log = capsys.readouterr().out
    assert log.count("recomputed from the stored scores, no model loaded") == 1  # filter (dedup then runs: no model)
    manifest = read_manifest(out)
    stages = manifest["stages"]
    assert stages["download"]["reused"] and stages["caption"]["reused"] and not stages["filter"]["reused"]
    assert stages["filter"]["model_passes"] == {"clip": 0} and stages["filter"]["decoded_images"] == 0
    assert manifest["config"]["filter"]["rule"] == "topk"
    before_kept, before_scores = _own_kept(_table(curated_out / "curated"))
    after_kept, after_scores = _own_kept(_table(out / "curated"))
    assert any(sum(k) > 1 for k in before_kept.values())  # the threshold rule kept several captions of some rows
    assert all(sum(k) == 1 for k in after_kept.values())   # top 1 keeps exactly one
    common = set(before_scores) & set(after_scores)
    assert len(common) > 10 and all(before_scores[u] == after_scores[u] for u in common)  # the stored scores


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


def _hidden(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.is_dir())


def test_a_rerun_with_another_input_is_refused_not_passed_off_as_its_output(curated_out, curate_args, curate_site,
                                                                          tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    three = tmp_path / "three.parquet"
    pq.write_table(pq.read_table(curate_site[2]).slice(0, 3), three)
    args = [*curate_args, "--output", str(out)]
    args[args.index("--input") + 1] = str(three)
    assert cli(["curate", *args]) == 2
    err = capsys.readouterr().err
    assert "download under" in err and "another input" in err and err.count("\n") == 1
    assert read_manifest(out)["counts"] == read_manifest(curated_out)["counts"]  # nothing was touched


def test_a_stage_job_refuses_a_committed_output_made_with_other_settings(curated_out, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    stages = out / "stages"
    config = tmp_path / "config.yaml"
    used = read_manifest(stages / "caption")["config"]
    config.write_text(json.dumps({**used, "caption": {**used["caption"], "top_p": 0.5}}))  # YAML reads JSON
    rc = cli(["caption", "--input", str(stages / "download"), "--output", str(stages / "caption"),
              "--config", str(config)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "caption.top_p" in err and "caption.model" not in err


class _Payload:
    """Unpickling this runs open(marker, 'w'): the marker file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_clip(tmp_path):
    """A copy of the shapes CLIP whose weights are a pickle that would create `marker` when loaded."""
    import torch
    from capfilt.udfs.models import SHAPES_CLIP
    folder, marker = tmp_path / "evil-clip", tmp_path / "payload-ran"
    shutil.copytree(SHAPES_CLIP, folder)
    (folder / "open_clip_model.safetensors").unlink()
    torch.save({"state_dict": _Payload(marker)}, folder / "open_clip_pytorch_model.bin")
    return folder, marker


@pytest.mark.slow
@pytest.mark.parametrize("model", ["missing", "pickle", "clip_as_captioner"])
def test_a_bad_model_reference_is_one_line_before_any_work(curate_args, tmp_path, capsys, model):
    from capfilt.udfs.models import SHAPES_CLIP
    out, marker = tmp_path / "out", None
    if model == "missing":
        override = f"filter.model={tmp_path / 'no-such-model'}"
    elif model == "pickle":
        folder, marker = _evil_clip(tmp_path)
        override = f"filter.model={folder}"
    else:
        override = f"caption.model={SHAPES_CLIP}"
    assert cli(["curate", *curate_args, "--output", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt: error: model ") and err.count("\n") == 1, err
    assert not (out / "stages").exists()  # nothing was downloaded
    assert marker is None or not marker.exists()


@pytest.mark.parametrize("problem", ["output_is_a_file", "output_under_a_file", "allow_host_port",
                                     "allow_host_empty", "missing_column"])
def test_argument_errors_are_one_line_and_leave_nothing_behind(curate_args, tmp_path, capsys, problem):
    out = tmp_path / "out"
    args = [*curate_args, "--output", str(out)]
    if problem == "output_is_a_file":
        out.write_text("not a folder")
    elif problem == "output_under_a_file":
        (tmp_path / "file").write_text("x")
        args[-1] = str(tmp_path / "file" / "out")
    elif problem == "allow_host_port":
        args += ["--allow-host", "127.0.0.1:abc"]
    elif problem == "allow_host_empty":
        args += ["--allow-host", ":80"]
    else:
        args += ["--url-col", "no_such_column"]
    assert cli(["curate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt: error: ") and "Traceback" not in err, err
    assert err.count("\n") == 1 or problem == "missing_column"  # that one lists the input's columns too
    assert _hidden(tmp_path) == []  # no .NAME.inprogress and no lock left behind


def test_a_second_run_on_the_same_output_is_refused_naming_the_pid_and_a_crashed_holder_frees_it(
        curate_args, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from capfilt.pipelines.output import OutputLock\n"
                               f"with OutputLock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli(["curate", *curate_args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err and err.count("\n") == 1, err
        assert not (out / "stages").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait(timeout=30)
    from capfilt.pipelines.output import OutputLock
    with OutputLock(str(out)):  # the kernel released the dead holder's lock
        pass


@pytest.mark.slow
def test_retry_failed_through_curate_may_change_fetch_settings_only(curated_out, curate_args, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    rc = cli(["curate", *curate_args, "--output", str(out), "--retry-failed", "--set", "download.image_size=32"])
    assert rc == 2
    assert "download.image_size" in capsys.readouterr().err
    rc = cli(["curate", *curate_args, "--output", str(out), "--retry-failed", "--set", "download.timeout=5"])
    assert rc == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest["counts"]["input"] == read_manifest(curated_out)["counts"]["input"]
    assert read_manifest(out / "stages" / "download")["config"]["download"]["timeout"] == 5
    assert len(read_manifest(out / "stages" / "download")["retries"]) == 1
    # A later plain rerun reuses everything: a fetch setting does not make the download stale.
    assert cli(["curate", *curate_args, "--output", str(out)]) == 0
    assert capsys.readouterr().out.count("committed by an earlier run, reused") == 4


@pytest.mark.parametrize("layout", ["stage_output_is_its_input", "stage_output_inside_its_input",
                                    "stage_input_inside_its_output", "curate_out_inside_the_input_folder",
                                    "curate_input_inside_out_stages"])
def test_an_output_that_overlaps_its_input_is_refused_before_any_work(curated_out, curate_args, curate_site,
                                                                        tmp_path, capsys, layout):
    from capfilt.udfs.models import SHAPES_CAPTIONER
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    download = out / "stages" / "download"
    before = sorted(p.name for p in download.rglob("*"))
    if layout.startswith("stage"):
        target = {"stage_output_is_its_input": download, "stage_output_inside_its_input": download / "caption",
                  "stage_input_inside_its_output": out / "stages"}[layout]
        # The shapes captioner: without the overlap check the stage would run, and replace its input.
        argv = ["caption", "--input", str(download), "--output", str(target), "--overwrite",
                "--set", f"caption.model={SHAPES_CAPTIONER}"]
    else:
        folder = tmp_path / "dump"
        folder.mkdir()
        shutil.copy(curate_site[2], folder / "metadata.parquet")
        if layout == "curate_out_inside_the_input_folder":
            argv = ["curate", *curate_args, "--output", str(folder / "out")]
            argv[argv.index("--input") + 1] = str(folder)
        else:
            shutil.copy(curate_site[2], download / "metadata.parquet")
            argv = ["curate", *curate_args, "--output", str(out), "--overwrite"]
            argv[argv.index("--input") + 1] = str(download / "metadata.parquet")
            before = sorted(p.name for p in download.rglob("*"))
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt: error: the ") and err.count("\n") == 1, err
    assert sorted(p.name for p in download.rglob("*")) == before  # the input is untouched


@pytest.mark.slow
def test_stage_commands_run_apart_score_as_the_fused_pass_and_reselect_from_their_own_scores(curated_out, tmp_path):
    """caption and filter as separate commands (split across pools): the filter decodes every image
    again, its scores equal the fused pass's, and a rerun with another rule loads no model."""
    fused = curated_out / "stages"
    stages, config = tmp_path / "stages", tmp_path / "config.yaml"
    used = read_manifest(fused / "filter")["config"]
    config.write_text(json.dumps(used))  # YAML reads JSON: the settings of the curate run
    assert cli(["caption", "--input", str(fused / "download"), "--output", str(stages / "caption"),
                "--config", str(config)]) == 0
    assert cli(["filter", "--input", str(stages / "caption"), "--output", str(stages / "filter"),
                "--config", str(config)]) == 0
    figures = read_manifest(stages / "filter")["figures"]
    rows = read_manifest(stages / "filter")["counts"]["input"]
    assert figures["decoded_images"] == rows and figures["model_passes"] == {"clip": rows}
    apart, together = (_scores(d / "filter" / "data") for d in (stages, fused))
    assert apart.keys() == together.keys()
    assert all(abs(apart[k] - together[k]) <= 1e-5 for k in apart)

    config.write_text(json.dumps({**used, "filter": {**used["filter"], "rule": "topk", "top_k": 1}}))
    assert cli(["filter", "--input", str(stages / "caption"), "--output", str(stages / "filter"),
                "--config", str(config)]) == 0
    manifest = read_manifest(stages / "filter")
    assert manifest["figures"]["model_passes"] == {"clip": 0} and manifest["figures"]["decoded_images"] == 0
    assert manifest["config"]["filter"]["rule"] == "topk"
    assert _scores(stages / "filter" / "data").items() <= apart.items()  # the same stored scores


def _candidates(data) -> list[dict]:
    import pyarrow.dataset as ds
    table = ds.dataset(data, partitioning="hive").to_table(columns=["candidates"]).to_pylist()
    return [c for r in table for c in r["candidates"]]


@pytest.mark.slow
def test_the_two_step_scorer_keeps_both_scores_reports_each_step_and_reselects_without_a_model(curated_out, tmp_path):
    """filter.scorer=two_step on a committed caption stage: CLIP scores every candidate, the ITM only
    those at or above clip_floor; the rule works on the ITM score; the manifest gives each step's
    pairs and seconds; another itm_threshold re-selects from the stored scores with no model."""
    from capfilt.udfs.models import SHAPES_ITM
    fused, out, config = curated_out / "stages", tmp_path / "filter", tmp_path / "config.yaml"
    used = read_manifest(fused / "filter")["config"]
    floor = used["filter"]["threshold"]
    settings = {**used, "filter": {**used["filter"], "scorer": "two_step", "itm_model": SHAPES_ITM,
                                   "itm_threshold": 0.5, "clip_floor": floor}}
    config.write_text(json.dumps(settings))
    assert cli(["filter", "--input", str(fused / "caption"), "--output", str(out), "--config", str(config)]) == 0
    manifest = read_manifest(out)
    assert manifest["figures"]["model_passes"] == {"clip": manifest["counts"]["input"]}
    assert manifest["models"]["scorer"] == "two_step" and manifest["models"]["itm"] == SHAPES_ITM
    steps = manifest["models"]["scoring"]
    candidates = _candidates(out / "data")
    rescored = [c for c in candidates if c["itm_score"] is not None]
    assert 0 < steps["itm"]["pairs"] < steps["clip"]["pairs"] and steps["itm"]["seconds"] > 0
    assert steps["itm"]["ms_per_image"] > 0 and steps["clip"]["ms_per_image"] > 0  # the rule's cost per image
    assert all((c["itm_score"] is not None) == (c["clip_score"] >= floor) for c in candidates)
    assert all(c["score"] == c["itm_score"] and c["kept"] == (c["itm_score"] >= 0.5) for c in rescored)
    assert any(c["kept"] for c in rescored) and any(not c["kept"] for c in rescored)

    config.write_text(json.dumps({**settings, "filter": {**settings["filter"], "itm_threshold": 0.9}}))
    assert cli(["filter", "--input", str(fused / "caption"), "--output", str(out), "--config", str(config)]) == 0
    again = read_manifest(out)
    assert again["figures"]["model_passes"] == {"clip": 0} and again["figures"]["decoded_images"] == 0
    after = _candidates(out / "data")
    assert {(c["text"], c["itm_score"]) for c in after} <= {(c["text"], c["itm_score"]) for c in candidates}
    assert all(c["kept"] == (c["itm_score"] is not None and c["itm_score"] >= 0.9) for c in after)


def _scores(data) -> dict:
    """(uid, candidate text) -> score from a filter stage's data."""
    import pyarrow.dataset as ds
    table = ds.dataset(data, partitioning="hive").to_table(columns=["uid", "candidates"]).to_pylist()
    return {(r["uid"], c["text"]): c["score"] for r in table for c in r["candidates"]}


@pytest.mark.slow
def test_optional_stages_join_and_leave_the_chain_of_a_committed_run(curated_out, curate_args, tmp_path, capsys):
    """Switching heads and decontamination on reruns only what follows filter (no model pass, nothing
    downloaded again); switching them off again recomputes dedup from filter's output."""
    import json as _json

    import numpy as np
    from safetensors.numpy import save_file

    from capfilt.udfs.heads import weights_sha256
    from capfilt.udfs.models import SHAPES_CLIP
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    head = tmp_path / "head"
    head.mkdir()
    save_file({"weight": np.random.default_rng(0).normal(size=(1, 64)).astype("float32"),
               "bias": np.zeros(1, "float32")}, str(head / "head.safetensors"))
    (head / "card.json").write_text(_json.dumps({
        "name": "tilt", "architecture": "linear", "threshold": 0.7, "direction": "above",
        "embedding_model": {"reference": "models/shapes-clip",
                            "sha256": weights_sha256(f"{SHAPES_CLIP}/open_clip_model.safetensors")}}))
    evals = tmp_path / "evals"
    evals.mkdir()
    first = sorted((curated_out / "stages" / "download" / "data").glob("*.parquet"))[0]
    import pyarrow.parquet as pq
    (evals / "one.jpg").write_bytes(pq.read_table(first, columns=["image"]).column("image")[0].as_py())
    on = ["--set", f"heads.drop=[{head}]", "--set", f"decontaminate.sets=[{evals}]"]
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    log = capsys.readouterr().out
    assert "stage 4/6: decontaminate" in log and "stage 5/6: heads" in log
    assert log.count("committed by an earlier run, reused") == 3
    manifest = read_manifest(out)
    assert list(manifest["stages"]) == ["download", "caption", "filter", "decontaminate", "heads", "dedup"]
    counts = manifest["counts"]
    assert counts["input"] == counts["output"] + counts["rejected_total"]
    assert counts["rejected"]["heads"]["tilt"] > 0 and manifest["stages"]["heads"]["decoded_images"] == 0
    assert counts["rejected"]["decontaminate"]["eval_contaminated"] >= 1
    curated = pq.read_table(out / "curated", columns=["head_scores"]).column("head_scores").to_pylist()
    assert all(s[0]["name"] == "tilt" and s[0]["score"] <= 0.7 for s in curated)
    assert cli(["inspect", str(out), "--html", str(tmp_path / "report.html")]) == 0  # the funnel shows both
    text, html = capsys.readouterr().out, (tmp_path / "report.html").read_text()
    for shown in (text, html):
        assert "decontaminate" in shown and "eval_contaminated" in shown and "tilt" in shown
    # killed while heads was writing: no manifest there, none for OUT; a rerun ends where the first did
    before = pq.read_table(out / "curated").sort_by("uid")
    (out / "stages" / "heads" / "manifest.json").unlink()
    (out / "manifest.json").unlink()
    assert curate([*curate_args, *on, "--output", str(out)]) == 0
    assert read_manifest(out)["counts"] == counts
    assert pq.read_table(out / "curated").sort_by("uid").equals(before)
    assert curate([*curate_args, "--output", str(out)]) == 0  # off again
    log = capsys.readouterr().out
    assert "stage 4/4: dedup" in log and "recomputed" in log
    assert read_manifest(out)["counts"] == read_manifest(curated_out)["counts"]


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.slow
def test_a_stage_command_into_a_finished_out_makes_it_stale_until_curate_rebuilds_it(
        curated_out, curate_args, tmp_path, capsys):
    """`capfilt filter --output OUT/stages/filter` with another threshold commits a new filter stage,
    while curated/ keeps the rows of the old one: inspect and export refuse OUT in one line naming
    the curate command that rebuilds it; that rerun (with the new threshold) reuses the new filter,
    runs dedup again from it (it was made from the old filter rows) and makes OUT current."""
    from capfilt.pipelines.output import changed_stages
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    shutil.copytree(curated_out, out)
    stages = out / "stages"
    used = read_manifest(stages / "filter")["config"]
    threshold = round(used["filter"]["threshold"] + 0.03, 4)
    config.write_text(json.dumps({**used, "filter": {**used["filter"], "threshold": threshold}}))
    assert cli(["filter", "--input", str(stages / "caption"), "--output", str(stages / "filter"),
                "--config", str(config)]) == 0
    kept_before, kept_now = (read_manifest(d / "stages" / "filter")["counts"]["output"] for d in (curated_out, out))
    assert kept_now < kept_before  # the stage now disagrees with curated/
    assert changed_stages(str(out), read_manifest(out)) == ["filter"]
    capsys.readouterr()
    for argv in (["inspect", str(out)], ["export", str(out), "--format", "json", "--to", str(tmp_path / "j")]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"capfilt: error: {out} is stale: stages/filter changed after") and err.count("\n") == 1
        assert f"rerun `capfilt curate --input {curate_args[1]} --output {out}`" in err, err

    assert curate([*curate_args, "--output", str(out), "--set", f"filter.threshold={threshold}"]) == 0
    log = capsys.readouterr().out
    assert log.count("committed by an earlier run, reused") == 3  # download, caption, and the new filter
    manifest = read_manifest(out)
    assert not manifest["stages"]["dedup"]["reused"] and manifest["stages"]["filter"]["reused"]
    assert read_manifest(stages / "dedup")["counts"]["input"] == kept_now
    assert changed_stages(str(out), manifest) == []  # current again: inspect and export take it
    assert _table(out / "curated").num_rows == manifest["counts"]["output"]


def test_a_stage_command_inside_out_takes_outs_lock_also_through_a_link(curated_out, tmp_path, capsys, no_spark):
    """While OUT is held (a curate, or an export reading it), a stage command writing OUT/stages/<stage>,
    typed through a symlink or not, is refused in one line before Spark; the stage is untouched."""
    import os

    from capfilt.pipelines.output import OutputLock
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    before = _tree(out / "stages" / "dedup")
    for shared in (False, True):
        with OutputLock(str(out), shared=shared):
            for root in (out, tmp_path / "link"):
                assert cli(["dedup", "--input", str(root / "stages" / "filter"), "--output",
                            str(root / "stages" / "dedup"), "--overwrite"]) == 2
                err = capsys.readouterr().err
                assert err.startswith(f"capfilt: error: {out} is ") and err.count("\n") == 1, err
                assert (f"in use by pid {os.getpid()}" if not shared else "being read by another") in err
    assert _tree(out / "stages" / "dedup") == before
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".lock", ".inprogress"))]


def test_curate_and_stage_commands_replace_only_what_capfilt_wrote(curated_out, curate_args, tmp_path, capsys,
                                                                  no_spark):
    """An output folder capfilt did not write, or wrote as something else, is refused before Spark with
    or without --overwrite: curate over a folder with its own curated/ or a foreign stages/dedup, or
    over a download output; a stage command over a folder of other files, a finished OUT, OUT's
    curated/ (download, caption and dedup)."""
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    mine = tmp_path / "mine"
    (mine / "curated").mkdir(parents=True)
    (mine / "curated" / "model.ckpt").write_text("mine")
    foreign_stage = tmp_path / "project"
    (foreign_stage / "stages" / "dedup").mkdir(parents=True)
    (foreign_stage / "stages" / "dedup" / "plan.txt").write_text("mine")
    download = out / "stages" / "download"
    cases = [(["curate", *curate_args, "--output", str(mine)], "holds curated/, which capfilt did not write"),
             (["curate", *curate_args, "--output", str(foreign_stage)], "holds files capfilt did not write (plan.txt"),
             (["curate", *curate_args, "--output", str(download)], "holds the download stage's output, not a `capfilt"),
             (["download", *curate_args, "--output", str(out)], "holds a `capfilt curate` output, not the download"),
             (["caption", "--input", str(download), "--output", str(mine / "curated")], "holds files capfilt did not"),
             (["dedup", "--input", str(out / "stages" / "filter"), "--output", str(out / "curated")],
              "holds files capfilt did not write")]
    before = {folder: _tree(folder) for folder in (out, mine, foreign_stage)}
    for argv, message in cases:
        for overwrite in ([], ["--overwrite"]):
            assert cli([*argv, *overwrite]) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("capfilt: error: output ") and message in err and err.count("\n") == 1, err
    assert {folder: _tree(folder) for folder in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
