"""`capfilt export`: the exports load in the tools trainers use (webdataset, open_clip_train, pandas,
DuckDB, pyarrow), every sample once, every caption byte for byte."""
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.jobs.cli import main as cli
from capfilt.pipelines.export import PANDAS_NA, export
from capfilt.schemas import CURATED, REJECTS
from tests.conftest import ROOT

HOSTILE = ["a caption, with commas; \"quotes\" and 'single' ones", "tab\tinside\tit", "two\nlines\r\nand a CR",
           "<script>alert('x')</script> & ampersands", "unicode: Grüße, 日本語, emoji 🦊, RTL \u202e",
           "  padded  ", "\"starts with a quote", "ends with a backslash \\", "{\"json\": [1, 2]}",
           "NA"]  # pandas reads this one as missing, quoted or not: counted, see test_csv...
N_ROWS = 45  # two Parquet files, three shards of 16 (the last one 13)


def _curated_rows(n: int, seed: int = 3) -> list[dict]:
    """Curated records with shapes-world images (JPEG, every fifth PNG) and captions that describe them,
    the HOSTILE ones spread over both files."""
    from capfilt.world.captions import describe
    from capfilt.world.scene import encode_jpeg, render, sample_scene
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = sample_scene(rng)
        picture = render(scene, 64, rng)
        if i % 5 == 4:
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
            image = buffer.getvalue()
        else:
            image = encode_jpeg(picture)
        truth = describe(scene, int(rng.integers(4)))
        primary = HOSTILE[i // 4] if i % 4 == 1 and i // 4 < len(HOSTILE) else truth
        web = f"stock photo {i}, {truth} | free download"
        rows.append({
            "uid": f"u{i:04d}", "url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": web, "image": image,
            "width": 64, "height": 64, "original_width": 128, "original_height": 128,
            "sha256": hashlib.sha256(image).hexdigest(),
            "candidates": [{"text": web, "source": "web", "score": 0.2, "kept": False},
                           {"text": primary, "source": "synthetic", "score": 0.9, "kept": True}],
            "best_score": 0.9, "caption_primary": primary,
            "image_embedding": np.ones(64, np.float16).tobytes(),
            "source_site": "shapes.example", "license": None if i % 2 else "cc-by"})
    return rows


def _write_out(root, rows: list[dict], rejected: int = 3) -> None:
    """A committed curate output: curated/ in two Parquet files, rejects/, stages/, manifest.json."""
    schema = CURATED.arrow_schema().append(pa.field("source_site", pa.string())).append(
        pa.field("license", pa.string()))
    (root / "curated").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema), root / "curated" / f"part-{i:05d}.zstd.parquet",
                       compression="zstd")
    (root / "rejects").mkdir()
    rejects = [{"uid": f"r{i}", "url": None, "caption": "x", "stage": "download", "reason": "invalid_url",
                "detail": None, "duplicate_of": None} for i in range(rejected)]
    pq.write_table(pa.Table.from_pylist(rejects, REJECTS.arrow_schema()), root / "rejects" / "part-00000.parquet")
    (root / "stages" / "download").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({
        "stage": "curate", "counts": {"input": len(rows) + rejected, "output": len(rows),
                                      "rejected_total": rejected,
                                      "rejected": {"download": {"invalid_url": rejected}}}}))


@pytest.fixture(scope="session")
def out(tmp_path_factory):
    """A small committed curated output (N_ROWS rows). Tests must not change it: copy it first."""
    root = tmp_path_factory.mktemp("export") / "out"
    _write_out(root, _curated_rows(N_ROWS))
    return root


@pytest.fixture(scope="session")
def expected(out):
    table = pq.read_table(out / "curated", columns=["uid", "caption_primary", "sha256"]).to_pandas()
    return table.set_index("uid")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A copy of the shapes-world CLIP (open_clip_config.json names an HF tokenizer, so open_clip's
    get_tokenizer('local-dir:...') loads tokenizer.json from this folder: the model's own 35 words)."""
    folder = tmp_path_factory.mktemp("models") / "shapes-clip"
    shutil.copytree(ROOT / "models" / "shapes-clip", folder)
    return folder


def test_webdataset_library_reads_every_sample_with_its_caption(spark, out, expected, tmp_path):
    import webdataset as wds
    summary = export(spark, str(out), "webdataset", str(tmp_path / "wds"), samples_per_shard=16)
    assert summary["samples"] == summary["train_num_samples"] == N_ROWS
    assert summary["shards"] == 3 and summary["shard_samples"] == [16, 16, 13]
    assert summary["train_data"] == str(tmp_path / "wds" / "shard-{00000..00002}.tar")
    assert (tmp_path / "wds" / "shards.txt").read_text().split() == [
        str(tmp_path / "wds" / f"shard-{i:05d}.tar") for i in range(3)]
    assert json.loads((tmp_path / "wds" / "export.json").read_text()) == summary
    seen, keys = {}, []
    for sample in wds.WebDataset(summary["train_data"], shardshuffle=False).decode("pil"):
        meta, image = sample["json"], sample.get("jpg") or sample.get("png")
        assert isinstance(image, Image.Image) and image.size == (meta["width"], meta["height"])
        assert meta["sha256"] == expected.sha256[meta["uid"]]
        assert [c["source"] for c in meta["candidates"]] == ["web", "synthetic"]
        assert ("png" in sample) == (meta["uid"] in {f"u{i:04d}" for i in range(4, N_ROWS, 5)})
        seen[meta["uid"]] = sample["txt"]
        keys.append(sample["__key__"])
    assert seen == expected.caption_primary.to_dict()  # every sample once, captions byte for byte
    assert set(HOSTILE) <= set(seen.values())
    assert len(set(keys)) == N_ROWS and all(k.isdigit() and "." not in k for k in keys)
    with tarfile.open(tmp_path / "wds" / "shard-00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]  # a sample's files together


def test_csv_export_loads_in_open_clip_csv_dataset_with_captions_intact(spark, out, expected, clip_dir, tmp_path):
    import open_clip
    from open_clip_train.data import CsvDataset
    summary = export(spark, str(out), "csv", str(tmp_path / "csv"), samples_per_shard=10)
    assert summary["file"] == str(tmp_path / "csv" / "train.csv") and summary["samples"] == N_ROWS
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    data = CsvDataset(summary["file"], preprocess, "filepath", "title", sep="\t", tokenizer=tokenizer)
    assert len(data) == N_ROWS
    missing = [t for t in expected.caption_primary if t in PANDAS_NA]
    assert summary["captions_pandas_reads_as_missing"] == len(missing) == 1
    read = ["NA" if isinstance(t, float) and np.isnan(t) else t for t in data.captions]
    assert sorted(read) == sorted(expected.caption_primary)  # commas, quotes, tabs, newlines survive
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in data.images)
    image, tokens = data[0]
    assert tuple(image.shape) == (3, 64, 64) and tuple(tokens.shape) == (32,)


def test_json_export_is_the_lavis_caption_format(spark, out, expected, tmp_path):
    summary = export(spark, str(out), "json", str(tmp_path / "json"), samples_per_shard=20)
    items = json.loads((tmp_path / "json" / "annotations.json").read_text(encoding="utf-8"))
    assert len(items) == summary["samples"] == len(expected)
    assert {item["image_id"]: item["caption"] for item in items} == expected.caption_primary.to_dict()
    for item in items:
        assert set(item) == {"image", "caption", "image_id"} and "/" not in item["image"]
        with Image.open(tmp_path / "json" / "images" / item["image"]) as image:
            assert image.size == (64, 64)
    assert sorted(os.listdir(tmp_path / "json")) == ["annotations.json", "export.json", "images"]


def test_export_refuses_an_unfinished_output_a_non_empty_target_and_its_own_source(out, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "manifest.json").unlink()
    assert cli(["export", str(unfinished), "--format", "json", "--to", str(tmp_path / "a")]) == 2
    assert "not a committed stage output" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert cli(["export", str(out), "--format", "json", "--to", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert cli(["export", str(unfinished.parent), "--format", "csv", "--to", str(unfinished.parent),
                "--overwrite"]) == 2  # not committed either; and never its own source:
    shutil.copy(out / "manifest.json", unfinished / "manifest.json")
    assert cli(["export", str(unfinished), "--format", "csv", "--to", str(unfinished), "--overwrite"]) == 2
    assert "holds the curated output" in capsys.readouterr().err
    assert (unfinished / "curated").is_dir()


def test_cli_overwrite_replaces_an_export_whole(out, tmp_path, capsys):
    target = tmp_path / "wds"
    target.mkdir()  # an earlier export with more shards: its old last shard must not survive
    (target / "export.json").write_text("{}")
    (target / "shard-00007.tar").write_text("old")
    assert cli(["export", str(out), "--format", "webdataset", "--to", str(target), "--samples-per-shard", "100",
                "--overwrite"]) == 0
    assert f"--train-data {shlex.quote(f'{target}/shard-00000.tar')} --train-num-samples {N_ROWS}" in \
        capsys.readouterr().out
    assert sorted(os.listdir(target)) == ["export.json", "shard-00000.tar", "shards.txt"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_refuses_any_target_inside_or_around_the_output_before_spark(out, tmp_path, capsys, no_spark):
    source = tmp_path / "out"
    shutil.copytree(out, source)
    (tmp_path / "link").symlink_to(source / "curated")  # a link into OUT is inside OUT
    (tmp_path / "a file").write_text("x")
    refused = [(source / "curated", "is inside the curated output"),
               (source / "stages" / "new", "is inside the curated output"),
               (tmp_path / "link", "is inside the curated output"),
               (tmp_path / "link" / "sub", "is inside the curated output"),
               (source, "holds the curated output"), (tmp_path, "holds the curated output"),
               (tmp_path / "a file", "exists and is not a folder"),
               (tmp_path / "a file" / "x", "is not a folder")]
    for target, message in refused:
        for fmt in ("json", "webdataset"):
            assert cli(["export", str(source), "--format", fmt, "--to", str(target), "--overwrite"]) == 2, target
            err = capsys.readouterr().err
            assert err.startswith("capfilt: error: ") and message in err and err.count("\n") == 1, err
    assert pq.read_table(source / "curated").num_rows == N_ROWS  # nothing touched
    assert sorted(os.listdir(source)) == sorted(os.listdir(out))
    for share in ("1.5", "-0.1", "nan"):
        assert cli(["export", str(source), "--format", "json", "--to", str(tmp_path / "x"), "--captions", "mix",
                    "--synthetic-share", share]) == 2
        err = capsys.readouterr().err
        assert err.startswith("capfilt: error: --synthetic-share must be between 0 and 1") and err.count("\n") == 1
    assert cli(["export", str(source), "--format", "json", "--to", str(tmp_path / "x"), "--captions", "all",
                "--synthetic-share", "0.5"]) == 2  # a share that would be ignored is refused, not dropped silently
    err = capsys.readouterr().err
    assert "--synthetic-share applies to --captions mix only" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_export_overwrite_replaces_only_an_earlier_export_never_the_input_or_another_output(
        out, tmp_path, capsys, no_spark):
    """--overwrite replaces DIR whole: the run's own input (the folder, a folder holding it, the glob's
    folder), another finished OUT, a folder of other files, and an earlier export with a file the
    export did not write are all refused in one line before Spark, untouched, nothing left behind."""
    source, dump, other = tmp_path / "out", tmp_path / "dump", tmp_path / "other-out"
    shutil.copytree(out, source)
    shutil.copytree(out, other)
    dump.mkdir()
    (dump / "metadata.parquet").write_bytes(b"the input")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "old-export").mkdir()
    (tmp_path / "old-export" / "export.json").write_text("{}")
    (tmp_path / "old-export" / "train.py").write_text("mine")
    (tmp_path / "dump-link").symlink_to(dump, target_is_directory=True)
    refused = [(dump, "overlaps the input"), (tmp_path / "dump-link", "overlaps the input"),
               (other, "is not an earlier export (it holds curated, manifest.json, rejects, ...; no export.json)"),
               (tmp_path / "mine", "is not an earlier export (it holds notes.txt; no export.json)"),
               (tmp_path / "old-export", "is not an earlier export (it holds train.py)")]
    before = {folder: _tree(folder) for folder in (dump, other, tmp_path / "mine", tmp_path / "old-export")}
    for spec in (str(dump / "metadata.parquet"), str(dump), str(dump / "*.parquet")):
        manifest = source / "stages" / "download" / "manifest.json"
        manifest.write_text(json.dumps({"stage": "download", "input": {"path": spec}}))  # as download records it
        for target, message in refused:
            assert cli(["export", str(source), "--format", "json", "--to", str(target), "--overwrite"]) == 2, target
            err = capsys.readouterr().err
            assert err.startswith("capfilt: error: ") and message in err and err.count("\n") == 1, err
    assert cli(["export", str(source), "--format", "json", "--to", str(tmp_path), "--overwrite"]) == 2  # holds both
    capsys.readouterr()
    assert {folder: _tree(folder) for folder in before} == before
    assert not [p for p in tmp_path.rglob(".*")]  # no .DIR.inprogress, no lock


def test_export_through_a_link_meets_the_lock_of_a_curate_rewriting_out(out, tmp_path, capsys, no_spark):
    """The lock is the folder's, not the path's as typed: while a writer (curate) holds OUT, an export
    of a symlink to OUT is refused in one line before Spark."""
    from capfilt.pipelines.output import OutputLock
    source = tmp_path / "out"
    shutil.copytree(out, source)
    (tmp_path / "link").symlink_to(source, target_is_directory=True)
    with OutputLock(str(source)):
        assert cli(["export", str(tmp_path / "link"), "--format", "json", "--to", str(tmp_path / "json")]) == 2
    err = capsys.readouterr().err
    assert err == (f"capfilt: error: {source} is in use by pid {os.getpid()} on {os.uname().nodename} "
                   f"(lock {tmp_path}/.out.lock); wait for it to finish or stop it\n")
    assert not (tmp_path / "json").exists() and not [p for p in tmp_path.rglob(".*")]


def test_printed_training_commands_quote_every_path(out, tmp_path, capsys):
    folder = tmp_path / "my exports" / "it's $HOME"
    for fmt, key in (("webdataset", "train_data"), ("csv", "file")):
        assert cli(["export", str(out), "--format", fmt, "--to", str(folder / fmt)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if "open_clip:" in line)
        words = shlex.split(line.split("open_clip:", 1)[1])
        summary = json.loads((folder / fmt / "export.json").read_text())
        assert words[words.index("--train-data") + 1] == summary[key], line
        assert summary[key].startswith(str(folder / fmt))


def test_a_failed_export_leaves_no_target(spark, tmp_path):
    rows = _curated_rows(6)
    rows[4]["image"] = b"GIF89a not a format the loaders read"
    _write_out(tmp_path / "bad", rows)
    with pytest.raises(Exception, match="unknown format"):
        export(spark, str(tmp_path / "bad"), "webdataset", str(tmp_path / "wds"), samples_per_shard=2)
    assert not (tmp_path / "wds").exists()  # only the hidden .wds.inprogress, which the next run clears
    broken = tmp_path / "broken"
    _write_out(broken, _curated_rows(6))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["counts"]["output"] = 7
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has 6 rows but its manifest counts 7"):
        export(spark, str(broken), "json", str(tmp_path / "json"))
    assert not (tmp_path / "json").exists()


def test_duckdb_and_pyarrow_read_the_curated_output_in_place(out, expected):
    import duckdb
    glob = str(out / "curated" / "*.parquet")
    rows = duckdb.sql(f"select uid, caption_primary, len(candidates) as n, source_site "
                      f"from read_parquet('{glob}')").df()
    assert dict(zip(rows.uid, rows.caption_primary)) == expected.caption_primary.to_dict()
    assert (rows.n == 2).all() and (rows.source_site == "shapes.example").all()
    table = pq.ParquetDataset(out / "curated").read()
    assert table.num_rows == N_ROWS and table.column("image").type == pa.binary()


def _train(clip_dir, data: str, kind: str, logs, extra=()) -> tuple[subprocess.CompletedProcess, float]:
    """A few steps of open_clip's own trainer, offline on CPU, from the shapes-world CLIP (its weights
    and its tokenizer, both read from the local-dir copy)."""
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{clip_dir}",
           "--train-data", data, "--dataset-type", kind, "--batch-size", "16", "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--lr", "1e-4", "--warmup", "1", "--logs", str(logs), "--name", kind,
           "--save-frequency", "1", "--log-every-n-steps", "1", "--seed", "0", "--report-to", "", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    run = subprocess.run(cmd, cwd=logs, env=env, capture_output=True, text=True, timeout=300)
    return run, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "csv"])
def test_open_clip_training_runs_on_the_export(spark, out, clip_dir, tmp_path, fmt):
    summary = export(spark, str(out), fmt, str(tmp_path / fmt), samples_per_shard=16)
    logs = tmp_path / "logs"
    logs.mkdir()
    if fmt == "webdataset":
        run, seconds = _train(clip_dir, summary["train_data"], "webdataset", logs,
                              ["--train-num-samples", str(summary["train_num_samples"])])
    else:
        run, seconds = _train(clip_dir, summary["file"], "csv", logs,
                              ["--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t"])
    log = run.stdout + run.stderr
    steps = [line for line in log.splitlines() if "Train Epoch: 0 [" in line and "Loss:" in line]
    print(f"open_clip_train on {fmt}: {seconds:.1f}s", *steps, sep="\n")
    assert run.returncode == 0, log[-4000:]
    # 45 samples, batches of 16: the webdataset loader rounds up to 3 batches, the csv loader drops the last
    assert len(steps) == (3 if fmt == "webdataset" else 2), log[-4000:]
    assert (logs / fmt / "checkpoints" / "epoch_1.pt").exists(), log[-2000:]


def _mixed_out(root, n: int):
    """Rows in three kinds by i % 3: web and two synthetic captions kept (the first synthetic best among the
    row's own) plus a kept synthetic caption inherited from a duplicate (dedup) and a web one not kept; only
    the first synthetic kept; only the web caption kept."""
    rows = _curated_rows(n)
    for i, row in enumerate(rows):
        web, first, second = row["caption"], f"first synthetic {i}", f"second synthetic {i}"
        kept = [(True, True, True), (False, True, False), (True, False, False)][i % 3]
        scores = [(0.5, 0.9, 0.7), (0.1, 0.8, 0.2), (0.6, 0.3, 0.2)][i % 3]
        row["candidates"] = [{"text": t, "source": s, "score": sc, "kept": k} for t, s, sc, k in zip(
            (web, first, second), ("web", "synthetic", "synthetic"), scores, kept)]
        if i % 3 == 0:  # the best score of all, but another image's caption: only `all` takes it
            row["candidates"] += [
                {"text": f"inherited {i}", "source": "inherited_synthetic", "score": 0.95, "kept": True},
                {"text": f"dropped {i}", "source": "inherited_web", "score": 0.1, "kept": False}]
        row["caption_primary"] = first if i % 3 < 2 else web
    _write_out(root, rows)
    return {row["uid"]: row for row in rows}


@pytest.mark.slow
def test_captions_mixed_at_export_primary_web_synthetic_all_and_a_seeded_mix(spark, tmp_path):
    import webdataset as wds
    rows = _mixed_out(tmp_path / "out", 300)
    kind = {uid: int(uid[1:]) % 3 for uid in rows}

    def samples(captions, fmt="json", **options):
        to = tmp_path / f"{captions}-{fmt}-{len(list(tmp_path.iterdir()))}"
        summary = export(spark, str(tmp_path / "out"), fmt, str(to), samples_per_shard=64, captions=captions,
                         **options)
        if fmt == "webdataset":
            got = [(s["json"]["uid"], s["txt"], s["json"]["caption_source"], s["__key__"])
                   for s in wds.WebDataset(summary["train_data"], shardshuffle=False).decode()]
        else:
            got = [(a["image_id"], a["caption"], a["image"]) for a in json.loads((to / "annotations.json").read_text())]
        assert summary["samples"] == len(got) and summary["captions"]["rows"] == 300
        return summary, got, to

    summary, got, _ = samples("primary")
    assert {uid: text for uid, text, _ in got} == {uid: r["caption_primary"] for uid, r in rows.items()}
    assert summary["captions"] == {"mode": "primary", "rows": 300, "web": 100, "synthetic": 200}
    summary, got, _ = samples("web")
    assert {uid: text for uid, text, _ in got} == {uid: r["caption"] for uid, r in rows.items() if kind[uid] != 1}
    assert summary["captions"]["rows_left_out"] == 100 and summary["captions"]["synthetic"] == 0
    summary, got, _ = samples("synthetic")  # the best kept synthetic caption, never a dropped one
    assert {uid: text for uid, text, _ in got} == {uid: f"first synthetic {uid[1:].lstrip('0') or 0}"
                                                   for uid in rows if kind[uid] != 2}
    assert summary["captions"]["rows_left_out"] == 100 and summary["captions"]["web"] == 0

    # all: every kept caption is a sample, inherited ones included; one image file per row, the samples name it
    summary, got, to = samples("all")
    per_row = {}
    for uid, text, image in got:
        per_row.setdefault(uid, []).append((text, image))
    assert {uid: sorted(t for t, _ in v) for uid, v in per_row.items()} == {
        uid: sorted(c["text"] for c in r["candidates"] if c["kept"]) for uid, r in rows.items()}
    assert len(got) == 600 and all(len({image for _, image in v}) == 1 for v in per_row.values())
    assert len(list((to / "images").iterdir())) == 300
    for uid, v in per_row.items():
        assert hashlib.sha256((to / "images" / v[0][1]).read_bytes()).hexdigest() == rows[uid]["sha256"]
    summary, got, _ = samples("all", "webdataset")  # self-contained samples: the image repeats, keys stay unique
    assert len(got) == 600 and len({key for *_, key in got}) == 600 and summary["captions"]["synthetic"] == 400

    # mix: one sample per row; rows with both sources follow a seeded draw with the asked share
    summary, got, _ = samples("mix", "webdataset", synthetic_share=0.8, seed=0)
    source = {uid: s for uid, _, s, _ in got}
    both = [uid for uid in rows if kind[uid] == 0]
    drawn_synthetic = sum(source[uid] == "synthetic" for uid in both)
    assert abs(drawn_synthetic - 0.8 * len(both)) <= 4 * (len(both) * 0.8 * 0.2) ** 0.5
    assert all(source[uid] == ("synthetic" if kind[uid] == 1 else "web") for uid in rows if kind[uid] != 0)
    # expected fallbacks: 100 rows drawn web w.p. 0.2 that kept none, 100 drawn synthetic w.p. 0.8 that kept none
    assert abs(summary["captions"]["fallbacks"] - 100) <= 4 * (100 * 0.16 * 2) ** 0.5
    for share in (0.0, 1.0):  # every row drawn web (100 kept none) or synthetic (100 kept none)
        extreme, every, _ = samples("mix", synthetic_share=share, seed=0)
        assert extreme["captions"]["fallbacks"] == 100 and len(every) == 300
        assert extreme["captions"]["synthetic"] == (100 if share == 0 else 200)
    again, got_again, _ = samples("mix", "webdataset", synthetic_share=0.8, seed=0)
    assert [(u, t) for u, t, *_ in got_again] == [(u, t) for u, t, *_ in got]  # a rerun draws the same
    other, got_other, _ = samples("mix", "webdataset", synthetic_share=0.8, seed=1)
    assert {uid: s for uid, _, s, _ in got_other} != source
