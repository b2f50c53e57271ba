"""`capfilt export`: the exports load in the tools trainers use, with every caption intact."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main as cli
from pipelines.export import export
from tests.conftest import ROOT

HOSTILE = ["a caption, with commas; \"quotes\" and 'single' ones", "tab\tinside\tit", "two\nlines\r\nand a CR",
           "<script>alert('x')</script> & ampersands", "unicode: Grüße, 日本語, emoji 🦊, RTL \u202e", "  padded  "]


@pytest.fixture(scope="module")
def out(curated_out, tmp_path_factory):
    """The curated output of the test corpus, with hostile text as some primary captions."""
    root = tmp_path_factory.mktemp("export") / "out"
    shutil.copytree(curated_out, root)
    for i, path in enumerate(sorted((root / "curated").glob("*.parquet"))):
        table = pq.read_table(path)
        captions = table.column("caption_primary").to_pylist()
        for j in range(min(len(HOSTILE), len(captions))):
            captions[(j * 7) % len(captions)] = HOSTILE[(i + j) % len(HOSTILE)]
        table = table.set_column(table.schema.get_field_index("caption_primary"), "caption_primary",
                                 pa.array(captions, pa.string()))
        pq.write_table(table, path, compression="zstd")
        path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
    return root


@pytest.fixture(scope="module")
def expected(out):
    table = pq.read_table(out / "curated", columns=["uid", "caption_primary", "sha256"]).to_pandas()
    return table.set_index("uid")


def test_webdataset_shards_hold_every_sample_and_the_webdataset_library_reads_them(spark, out, expected, tmp_path):
    import webdataset as wds
    summary = export(spark, str(out), "webdataset", str(tmp_path / "wds"), samples_per_shard=40)
    assert summary["samples"] == len(expected) and summary["shards"] == -(-len(expected) // 40)
    shards = (tmp_path / "wds" / "shards.txt").read_text().split()
    assert len(shards) == summary["shards"] and "{00000.." in summary["train_data"]
    seen = {}
    for sample in wds.WebDataset(summary["train_data"], shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = sample.get("jpg") or sample.get("png")
        assert isinstance(image, Image.Image) and image.size == (meta["width"], meta["height"])
        seen[meta["uid"]] = sample["txt"]
        assert [c["source"] for c in meta["candidates"]][0] in ("web", "synthetic", "inherited_web")
    assert seen == expected.caption_primary.to_dict()  # every sample once, captions byte for byte
    assert set(HOSTILE) <= set(seen.values())
    assert json.loads((tmp_path / "wds" / "export.json").read_text())["train_num_samples"] == len(expected)


def test_csv_export_round_trips_hostile_captions_through_pandas(spark, out, expected, tmp_path):
    summary = export(spark, str(out), "csv", str(tmp_path / "csv"), samples_per_shard=50)
    table = pd.read_csv(summary["file"], sep="\t")  # what open_clip's CsvDataset does
    assert list(table.columns) == ["filepath", "title"] and len(table) == len(expected)
    assert sorted(table.title) == sorted(expected.caption_primary)
    assert all(os.path.isabs(p) and os.path.exists(p) for p in table.filepath)


def test_json_export_is_the_lavis_caption_format(spark, out, expected, tmp_path):
    summary = export(spark, str(out), "json", str(tmp_path / "json"))
    items = json.loads((tmp_path / "json" / "annotations.json").read_text())
    assert {item["image_id"]: item["caption"] for item in items} == expected.caption_primary.to_dict()
    assert all((tmp_path / "json" / "images" / item["image"]).is_file() for item in items)
    assert summary["samples"] == len(items)


def test_export_refuses_an_unfinished_output_and_a_non_empty_target(out, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "manifest.json").unlink()
    assert cli(["export", str(unfinished), "--format", "json", "--to", str(tmp_path / "a")]) == 2
    assert "not a committed stage output" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert cli(["export", str(out), "--format", "json", "--to", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_duckdb_and_pyarrow_read_the_curated_output_in_place(out, expected):
    import duckdb
    glob = str(out / "curated" / "*.parquet")
    rows = duckdb.sql(f"select uid, caption_primary, len(candidates) as n from read_parquet('{glob}')").df()
    assert dict(zip(rows.uid, rows.caption_primary)) == expected.caption_primary.to_dict()
    assert (rows.n >= 1).all()
    assert pq.ParquetDataset(out / "curated").read(columns=["sha256"]).num_rows == len(expected)


def _train(data: str, kind: str, logs, extra=()):
    """A few steps of open_clip's own trainer, offline on CPU, from the shapes-world CLIP's config."""
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{ROOT / 'models' / 'shapes-clip'}",
           "--train-data", data, "--dataset-type", kind, "--batch-size", "16", "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--lr", "1e-4", "--warmup", "1", "--logs", str(logs), "--name", kind,
           "--save-frequency", "1", "--log-every-n-steps", "1", "--seed", "0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=logs, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "csv"])
def test_open_clip_training_runs_on_the_export(spark, out, expected, tmp_path, fmt):
    summary = export(spark, str(out), fmt, str(tmp_path / fmt), samples_per_shard=40)
    logs = tmp_path / "logs"
    logs.mkdir()
    if fmt == "webdataset":
        run = _train(summary["train_data"], "webdataset", logs,
                     ["--train-num-samples", str(summary["train_num_samples"])])
    else:
        run = _train(summary["file"], "csv", logs,
                     ["--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t"])
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Train Epoch: 0 [" in log and "Loss:" in log, log[-4000:]
    assert (logs / fmt / "checkpoints" / "epoch_1.pt").exists(), log[-2000:]
