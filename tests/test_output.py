import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from capfilt.pipelines.io import empty_rejects, read_rejects, read_stage
from capfilt.pipelines.registry import definition
from capfilt.pipelines.stage import write_output

WHOLE = definition("download")  # a stage that writes whole records
from capfilt.pipelines.output import (ConservationError, Counts, NotCommittedError, StageOutput, build_manifest,
                              read_manifest)
from capfilt.schemas import PAIRS
from tests.conftest import ROOT


def test_commit_makes_the_layout_and_a_rerun_is_skipped(tmp_path):
    out = StageOutput(str(tmp_path / "stage"), "demo")
    assert out.begin()
    (tmp_path / "marker").write_text("x")
    os.makedirs(out.data_dir)
    out.commit(build_manifest(out, {}, Counts(input=3, output=2, rejected={"demo": {"bad": 1}})))
    assert read_manifest(tmp_path / "stage")["counts"]["rejected_total"] == 1
    assert not list(tmp_path.glob(".stage*")), "no in-progress directory left behind"
    assert StageOutput(str(tmp_path / "stage"), "demo").begin() is False
    again = StageOutput(str(tmp_path / "stage"), "demo", overwrite=True)
    assert again.begin()
    again.commit(build_manifest(again, {}, Counts(input=1, output=1)))
    assert read_manifest(tmp_path / "stage")["counts"]["input"] == 1


def test_a_killed_runs_work_is_continued_only_under_the_same_fingerprint(tmp_path, capsys):
    """StageOutput.resume, the one resume rule of the download and the model passes."""
    from capfilt.pipelines.output import StageOutput

    def killed_then_rerun(fingerprint, marker):
        out = StageOutput(str(tmp_path / "stage"), "demo")
        out.begin(resume=True)
        return out, out.resume(fingerprint, marker)

    out, continued = killed_then_rerun("a", "model/fingerprint")
    assert not continued and (tmp_path / ".stage.inprogress" / "model" / "fingerprint").read_text() == "a"
    (tmp_path / ".stage.inprogress" / "model" / "capfilt_part=0").mkdir()  # a part the killed run finished
    out, continued = killed_then_rerun("a", "model/fingerprint")
    assert continued and (tmp_path / ".stage.inprogress" / "model" / "capfilt_part=0").exists()
    assert "starting over" not in capsys.readouterr().out
    out, continued = killed_then_rerun("b", "model/fingerprint")  # other input or settings
    assert not continued and not (tmp_path / ".stage.inprogress" / "model" / "capfilt_part=0").exists()
    assert (tmp_path / ".stage.inprogress" / "model" / "fingerprint").read_text() == "b"
    assert "starting over" in capsys.readouterr().out


def test_counts_that_do_not_add_up_are_refused_and_nothing_is_committed(tmp_path):
    out = StageOutput(str(tmp_path / "stage"), "demo")
    out.begin()
    with pytest.raises(ConservationError, match=r"input 10 != output 7 \+ rejected 2.*\+1 rows unaccounted"):
        out.commit(build_manifest(out, {}, Counts(input=10, output=7, rejected={"demo": {"x": 2}})))
    out.abort()
    with pytest.raises(NotCommittedError):
        read_manifest(tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


def test_a_killed_write_leaves_nothing_a_reader_takes_for_finished(tmp_path, spark):
    target = tmp_path / "stage"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from capfilt.pipelines.output import StageOutput
        out = StageOutput({str(target)!r}, "demo")
        out.begin()
        os.makedirs(out.data_dir)
        open(out.data_dir + "/part-0.parquet", "wb").write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = list(tmp_path.glob(".stage.inprogress*"))
    assert len(leftovers) == 1, "the killed run's work is hidden, not published"
    with pytest.raises(NotCommittedError, match="not a committed stage output"):
        read_stage(spark, str(target), PAIRS)
    # Spark reading the parent folder does not pick up the hidden half-written directory.
    assert spark.read.option("recursiveFileLookup", True).format("binaryFile").load(str(tmp_path)).count() == 0
    rerun = StageOutput(str(target), "demo")
    assert rerun.begin()
    assert not (leftovers[0] / "data").exists(), "the next run clears the stale in-progress directory"
    rerun.abort()
    resumed = StageOutput(str(target), "demo")
    resumed.begin()
    os.makedirs(resumed.path("work"))
    again = StageOutput(str(target), "demo")
    again.begin(resume=True)
    assert os.path.isdir(again.path("work")), "a resumable stage keeps the killed run's work"


def test_the_writer_counts_what_was_written(spark, tmp_path):
    data = spark.createDataFrame([("a", "http://h/a", "x"), ("b", "http://h/b", "y")], PAIRS.spark_schema())
    rejects = spark.createDataFrame([("c", "http://h/c", None, "demo", "too_small", "4x4", None)],
                                    "uid string, url string, caption string, stage string, reason string, "
                                    "detail string, duplicate_of string")
    out = StageOutput(str(tmp_path / "s"), "demo")
    out.begin()
    counts = write_output(out, WHOLE, data, rejects, n_input=3)[0]
    assert counts.to_dict() == {"input": 3, "output": 2, "rejected_total": 1, "rejected": {"demo": {"too_small": 1}}}
    out.commit(build_manifest(out, {"k": 1}, counts))
    assert sorted(r.uid for r in read_stage(spark, str(tmp_path / "s"), PAIRS).collect()) == ["a", "b"]
    assert read_rejects(spark, str(tmp_path / "s")).count() == 1
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["versions"]["pyspark"].startswith("4.") and manifest["config"] == {"k": 1}


def test_empty_rejects_still_make_a_readable_table(spark, tmp_path):
    data = spark.createDataFrame([("a", "u", "x")], PAIRS.spark_schema())
    out = StageOutput(str(tmp_path / "s"), "demo")
    out.begin()
    counts = write_output(out, WHOLE, data, empty_rejects(spark), n_input=1)[0]
    out.commit(build_manifest(out, {}, counts))
    assert read_rejects(spark, str(tmp_path / "s")).count() == 0


def test_readers_share_an_output_and_a_writer_is_refused_while_it_is_read_and_vice_versa(tmp_path):
    from capfilt.pipelines.output import OutputInUse, OutputLock
    out = str(tmp_path / "out")
    with OutputLock(out, shared=True), OutputLock(out, shared=True):  # an export and an inspect at once
        with pytest.raises(OutputInUse, match="being read by another capfilt process"):
            with OutputLock(out):
                pass
    with OutputLock(out):
        with pytest.raises(OutputInUse, match=f"in use by pid {os.getpid()} "):
            with OutputLock(out, shared=True):
                pass
    with OutputLock(out):  # every holder above has let go
        pass
    assert not any(tmp_path.iterdir())  # the last holder removed the lock file


def test_ctrl_c_is_one_line_that_says_how_to_resume(capsys):
    from capfilt.jobs.common import run

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "capfilt: interrupted: committed work is kept; rerun the same command to resume"


# ---------------------------------------------------------------------------------------------------
# The lock names the folder, and capfilt replaces only what it wrote.

def test_the_lock_is_the_folders_not_the_spelling_of_its_path(tmp_path, monkeypatch):
    """An export through a symlink to OUT, or OUT typed relative or with `..`, must meet a curate
    rewriting OUT: one lock per folder, however its path is written (parents that do not exist yet
    too)."""
    from capfilt.pipelines.output import OutputInUse, OutputLock
    real = tmp_path / "data" / "out"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "data-link").symlink_to(tmp_path / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "data")
    spellings = [str(tmp_path / "link"), str(tmp_path / "link") + "/", "out", "./out/",
                 str(tmp_path / "data" / ".." / "link"), f"file://{tmp_path}/link"]
    for spelling in spellings:
        with OutputLock(str(real)):
            with pytest.raises(OutputInUse, match=f"in use by pid {os.getpid()} "):
                with OutputLock(spelling, shared=True):
                    pass
    new = tmp_path / "data" / "new"  # not there yet: curate creates it inside the lock
    with OutputLock(str(tmp_path / "data-link" / "new")):
        with pytest.raises(OutputInUse):
            with OutputLock(str(new)):
                pass
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["out"]  # no lock file left


def _committed(folder, stage):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage}))
    (folder / "data").mkdir()


def test_a_stage_commit_replaces_only_its_own_stage_output(tmp_path):
    """A commit moves the new folder onto the old one: a folder of someone else's files, another
    stage's output or a curate output under that name is refused before anything is written (with or
    without --overwrite); an empty folder or the stage's own output is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "week-of-crawl.parquet").write_text("precious")
    _committed(tmp_path / "filter", "filter")
    _committed(tmp_path / "out", "curate")
    for folder, message in ((mine, "holds files capfilt did not write"),
                            (tmp_path / "filter", "holds the filter stage's output, not the dedup stage's"),
                            (tmp_path / "out", "holds a `capfilt curate` output, not the dedup stage's")):
        for overwrite in (False, True):
            out = StageOutput(str(folder), "dedup", overwrite=overwrite)
            with pytest.raises(ValueError, match=message):
                out.begin()
    assert (mine / "week-of-crawl.parquet").read_text() == "precious"
    assert json.loads((tmp_path / "filter" / "manifest.json").read_text()) == {"stage": "filter"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing begun
    (tmp_path / "empty").mkdir()
    _committed(tmp_path / "dedup", "dedup")
    for folder in (tmp_path / "empty", tmp_path / "dedup"):
        out = StageOutput(str(folder), "dedup", overwrite=True)
        assert out.begin()
        out.commit(build_manifest(out, {}, Counts(input=1, output=1)))
        assert read_manifest(folder)["stage"] == "dedup"


def test_a_stage_folder_that_lost_its_manifest_is_replaced_a_data_folder_of_someone_else_is_not(tmp_path):
    """A stage output without manifest.json (a move cut short on an object store, a hand edit) is still
    capfilt's: only data/, rejects/ (committed by Spark: _SUCCESS) and Spark's part files. The same
    names holding other files are someone's data."""
    spark_part = "part-00000-54cbe9d3-fd9d-4c8b-a4bd-78037ff5ffb6-c000.zstd.parquet"
    for name, data_file in (("lost", spark_part), ("theirs", "crawl-2024.parquet")):
        for sub, file in (("data/capfilt_part=0", data_file), ("rejects", spark_part), ("rejects", "_SUCCESS")):
            (tmp_path / name / sub).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / sub / file).write_text("x")
    assert StageOutput(str(tmp_path / "lost"), "dedup").begin()
    (tmp_path / "theirs" / "data" / "crawl-2024.parquet").write_text("mine")
    with pytest.raises(ValueError, match="holds files capfilt did not write"):
        StageOutput(str(tmp_path / "theirs"), "dedup", overwrite=True).begin()
    assert (tmp_path / "theirs" / "data" / "crawl-2024.parquet").read_text() == "mine"


def test_world_generate_overwrite_replaces_only_a_corpus(tmp_path, capsys):
    """`--overwrite` removes OUT/site and OUT/metadata.*: a folder holding anything the world did not
    write (say a web root with its own site/) is refused, before anything is removed."""
    from capfilt.jobs.cli import main as capfilt
    www = tmp_path / "www"
    (www / "site").mkdir(parents=True)
    (www / "site" / "index.html").write_text("mine")
    (www / "notes.txt").write_text("mine")
    assert capfilt(["world", "generate", "--out", str(www), "--n", "40", "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"capfilt world: error: --out {www} holds files the shapes world did not "
                                       f"write (notes.txt): generate into a new or empty folder; --overwrite "
                                       f"replaces only a corpus\n")
    assert (www / "site" / "index.html").read_text() == "mine" and (www / "notes.txt").read_text() == "mine"


def test_world_eval_set_overwrite_removes_only_the_sets_own_files(tmp_path, capsys):
    """The old set's manifest lists what to remove: a name outside the folder, or other files beside
    the set, are refused before any file is removed."""
    from capfilt.jobs.cli import main as capfilt
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    evalset = tmp_path / "eval"
    evalset.mkdir()
    (evalset / "eval_set.json").write_text(json.dumps({"files": ["../victim.txt", "a.jpg"]}))
    (evalset / "a.jpg").write_text("x")
    assert capfilt(["world", "eval-set", "--out", str(evalset), "--n", "2", "--overwrite"]) == 2
    assert "names files outside" in capsys.readouterr().err
    (evalset / "eval_set.json").write_text(json.dumps({"files": ["a.jpg"]}))
    (evalset / "mine.txt").write_text("mine")
    assert capfilt(["world", "eval-set", "--out", str(evalset), "--n", "2", "--overwrite"]) == 2
    assert "holds more than an evaluation set (mine.txt)" in capsys.readouterr().err
    assert victim.read_text() == "mine" and (evalset / "a.jpg").exists() and (evalset / "mine.txt").exists()


def test_lab_train_and_eval_replace_only_what_lab_wrote(tmp_path, capsys, monkeypatch):
    """`lab train --out DIR` replaces DIR whole after minutes of training, `eval --json FILE` replaces
    FILE, `eval --update-card` rewrites model_card.json: a folder without lab's card, a file that is not
    an eval report and a card that is not a JSON object are refused before any training or evaluation."""
    import capfilt.lab.cli as lab
    from capfilt.jobs.cli import main as capfilt
    monkeypatch.setattr(lab, "evaluate", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    import capfilt.lab.train_clip as train_clip
    import capfilt.lab.train_head as train_head
    monkeypatch.setattr(train_head, "train_head", lambda *a, **k: pytest.fail("trained before the refusal"))
    monkeypatch.setattr(train_clip, "train", lambda *a, **k: pytest.fail("trained before the refusal"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    config = tmp_path / "open_clip_config.json"
    config.write_text('{"model_cfg": {}}')
    listed, broken = tmp_path / "listed", tmp_path / "broken"
    for folder, card in ((listed, "[]"), (broken, "{not json")):
        folder.mkdir()
        (folder / "model_card.json").write_text(card)
    for argv, message in ((["eval", "--clip", str(listed), "--update-card"], "model_card.json must hold a JSON object, not a list"),
                          (["eval", "--itm", str(broken), "--update-card"], "model_card.json is not valid JSON"),
                          (["train", "clip", "--out", str(mine)], f"--out {mine} holds files but no model_card.json"),
                          (["train-head", "--kind", "watermark", "--out", str(mine)], "holds files but no card.json"),
                          (["train", "clip", "--out", str(mine / "thesis.tex")], "is a file, not a model folder"),
                          (["eval", "--clip", "x", "--json", str(config)], "exists and is not an eval report")):
        assert capfilt(["lab", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("capfilt: error: ") and message in err and err.count("\n") == 1, err
    assert (mine / "thesis.tex").read_text() == "mine" and config.read_text() == '{"model_cfg": {}}'


def test_package_replaces_only_an_earlier_capfilt_zip(tmp_path, capsys):
    from importlib import metadata

    from capfilt.jobs.cli import main as capfilt
    name = f"capfilt-{metadata.version('capfilt')}-pyfiles.zip"
    (tmp_path / "a file").write_text("x")
    (tmp_path / "dir" / name).mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / name).write_text("not a zip of ours")
    for out, message in ((tmp_path / "a file", "is a file, not a folder"), (tmp_path / "dir", "is a folder"),
                         (tmp_path / "other", "exists and is not a capfilt zip")):
        assert capfilt(["package", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("capfilt: error: ") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "other" / name).read_text() == "not a zip of ours"
    assert capfilt(["package", "--out", str(tmp_path / "dist")]) == 0
    assert capfilt(["package", "--out", str(tmp_path / "dist")]) == 0  # its own zip is replaced
