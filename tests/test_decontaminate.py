import functools
"""Evaluation-set decontamination: the three evaluation-set formats, exact and near copies found, other
rows kept, rows conserved, a rerun identical."""
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.jobs.common import run_stage_job
from capfilt.udfs.models import SHAPES_CLIP
from capfilt.world.scene import encode_jpeg, render, sample_scene


def _modified(data: bytes, crop: float, scale: float, quality: int) -> bytes:
    """A re-encoded, resized and slightly cropped copy, as an evaluation image copied into the web is."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    dx, dy = int(w * crop), int(h * crop)
    image = image.crop((dx, dy, w - dx, h - dy)).resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def eval_set(curated_out, curate_site, tmp_path_factory):
    """Evaluation items: 2 exact copies and 4 modified copies of clean rows that reached the filter
    output, and 20 unrelated scenes. Written as a folder, Parquet, and WebDataset tars."""
    import numpy as np
    root = tmp_path_factory.mktemp("eval")
    world, _, _ = curate_site
    truth = pq.read_table(world / "truth.parquet").to_pandas()
    kept = set(pq.read_table(curated_out / "stages" / "filter" / "data", columns=["uid"]).column("uid").to_pylist())
    copied = set(truth["duplicate_of"].dropna())
    # Originals whose scene no other row shows: the shapes world draws one description at nearly the same
    # place every time, so another row of the same scene can be the same picture (docs/filters.md).
    unique = truth["scene"].map(truth["scene"].value_counts()) == 1
    rows = truth[truth["id"].isin(kept) & (truth["kind"] == "clean") & truth["duplicate_of"].isna() & unique
                 & ~truth["id"].isin(copied) & truth["fault"].isna() & truth["variant"].isna()].head(6)
    items = {}
    for i, (_, row) in enumerate(rows.iterrows()):
        data = (world / "site" / row["file"]).read_bytes()
        items[f"copy{i}"] = (data if i < 2 else _modified(data, crop=0.015 * (i - 1), scale=(0.7, 1.3, 0.9, 1.1)[i - 2],
                                                              quality=(70, 85, 60, 90)[i - 2]), row["id"])
    # Distractors: scenes the corpus does not hold. (The shapes world draws one description at nearly the
    # same place every time, so another picture of a scene in the data would be a look-alike, not a
    # distractor: docs/dedup.md.)
    rng, seen, n = np.random.default_rng(99), set(truth["scene"]), 0
    while n < 20:
        scene = sample_scene(rng)
        if scene.to_json() not in seen:
            items[f"other{n}"] = (encode_jpeg(render(scene, 128), 90), None)
            seen.add(scene.to_json())
            n += 1
    folder = root / "folder" / "shapes-eval"
    folder.mkdir(parents=True)
    for key, (data, _) in items.items():
        (folder / f"{key}.jpg").write_bytes(data)
    pq.write_table(pa.table({"key": list(items), "image": [d for d, _ in items.values()]}), root / "shapes-eval.parquet")
    tars = root / "wds" / "shapes-eval"
    tars.mkdir(parents=True)
    for n, chunk in enumerate((list(items)[:13], list(items)[13:])):
        with tarfile.open(tars / f"{n:05d}.tar", "w") as tar:
            for key in chunk:
                for name, body in ((f"{key}.jpg", items[key][0]), (f"{key}.txt", b"caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    return {"folder": folder, "parquet": root / "shapes-eval.parquet", "wds": tars,
            "expected": {row_id: f"shapes-eval/{key}" for key, (_, row_id) in items.items() if row_id},
            "bytes": {f"shapes-eval/{k}": d for k, (d, _) in items.items()}}


@pytest.mark.parametrize("kind", ["folder", "parquet", "wds"])
def test_every_format_reads_the_same_items(eval_set, spark, kind):
    from capfilt.pipelines.image_sets import set_images
    got = {r["eval_id"]: bytes(r["image"]) for r in set_images(spark, str(eval_set[kind]), "decontaminate.sets").collect()}
    assert got == eval_set["bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["folder", "parquet", "wds"])
def test_the_worlds_evaluation_sets_read_as_written(tmp_path, spark, fmt):
    """make_eval_set's layouts (with eval_set.json beside the images, Parquet or tars)."""
    from capfilt.pipelines.image_sets import set_images
    from capfilt.world.evalset import make_eval_set, read_eval_set
    make_eval_set(tmp_path / "set", 7, seed=3, fmt=fmt)
    got = {r["eval_id"]: bytes(r["image"]) for r in set_images(spark, str(tmp_path / "set"), "decontaminate.sets").collect()}
    assert got == {f"set/{e.id}": e.jpeg for e in read_eval_set(tmp_path / "set")}


def _run(curated_out, out, sets, *more):
    main = functools.partial(run_stage_job, "decontaminate")
    return main(["--input", str(curated_out / "stages" / "filter"), "--output", str(out), *more,
                 "--set", f"decontaminate.sets=[{','.join(map(str, sets))}]", "--set", f"filter.model={SHAPES_CLIP}",
                 "--set", "download.image_size=64"])


@pytest.mark.slow
def test_copies_of_evaluation_images_leave_and_nothing_else(curated_out, eval_set, tmp_path, spark):
    out = tmp_path / "decon"
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    settings = _as_overrides(shapes_world_settings(load_config(None)))  # the run's download and CLIP settings
    assert _run(curated_out, out, [eval_set["folder"]], *settings, "--set", f"filter.model={SHAPES_CLIP}") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == counts["output"] + counts["rejected_total"]
    assert manifest["models"]["eval_sets"]["images"] == 26 and manifest["figures"]["decoded_images"] == 0
    rejects = spark.read.parquet(str(out / "rejects")).toPandas().set_index("uid")
    assert set(rejects["reason"]) == {"eval_contaminated"}
    found = {uid: detail.split(": ")[0].removeprefix("eval item ") for uid, detail in rejects["detail"].items()}
    # Every planted copy leaves and nothing else does. The detail names the nearest evaluation image: for
    # a modified copy that may be a look-alike scene of the set at a cosine as high (docs/filters.md).
    assert set(found) == set(eval_set["expected"])
    assert sum(found[uid] == eval_set["expected"][uid] for uid in found) >= len(found) - 1
    exact = [uid for uid, d in rejects["detail"].items() if d.endswith("identical bytes (sha256)")]
    assert len(exact) == 2
    assert not (out / "work").exists() and not list(out.parent.glob(".*decon*"))
    # a rerun from scratch writes the same rows and rejects
    again = tmp_path / "again"
    assert _run(curated_out, again, [eval_set["folder"]], *settings, "--set", f"filter.model={SHAPES_CLIP}") == 0
    for name in ("data", "rejects"):
        a = spark.read.parquet(str(out / name)).orderBy("uid").collect()
        b = spark.read.parquet(str(again / name)).orderBy("uid").collect()
        assert a == b


def test_missing_or_empty_evaluation_sets_are_one_line(curated_out, tmp_path, capsys):
    from capfilt.jobs.common import run
    main = functools.partial(run_stage_job, "decontaminate")
    args = ["--input", str(curated_out / "stages" / "filter"), "--output", str(tmp_path / "o"),
            "--set", f"filter.model={SHAPES_CLIP}"]
    assert run(main, [*args, "--set", f"decontaminate.sets=[{tmp_path / 'nowhere'}]"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert run(main, [*args, "--set", f"decontaminate.sets=[{tmp_path / 'empty'}]"]) == 2
    assert "holds no images" in capsys.readouterr().err
    pq.write_table(pa.table({"key": ["a"], "caption": ["no image here"]}), tmp_path / "captions.parquet")
    assert run(main, [*args, "--set", f"decontaminate.sets=[{tmp_path / 'captions.parquet'}]"]) == 2
    assert "no image bytes column" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


# --- evaluation sets that cannot be read: refused on the driver, before Spark -----------------------

def _jpeg() -> bytes:
    import numpy as np
    return encode_jpeg(render(sample_scene(np.random.default_rng(0)), 64), 90)


def _tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _random_bytes_tar(folder):
    (folder / "000.tar").write_bytes(bytes(range(256)) * 40)


def _truncated_tar(folder):
    _tar(folder / "000.tar", [("a.jpg", _jpeg() * 4), ("b.jpg", _jpeg())])
    (folder / "000.tar").write_bytes((folder / "000.tar").read_bytes()[:1500])


def _corrupt_parquet(folder):
    pq.write_table(pa.table({"key": ["a"], "image": [_jpeg()]}), folder / "a.parquet")
    (folder / "a.parquet").write_bytes((folder / "a.parquet").read_bytes()[:-40])


BROKEN_SETS = {
    # item 14 of issue 32: random bytes named .tar failed after the model stages with a 327-line traceback
    "random_bytes_tar": (_random_bytes_tar, "000.tar is not a readable tar"),
    "empty_file_tar": (lambda f: (f / "000.tar").write_bytes(b""), "000.tar is not a readable tar"),
    "tar_without_members": (lambda f: _tar(f / "000.tar", []), "000.tar holds no images (0 members"),
    "tar_without_images": (lambda f: _tar(f / "000.tar", [("a.txt", b"a caption")]), "000.tar holds no images"),
    "truncated_tar": (_truncated_tar, "000.tar is not a readable tar"),
    "corrupt_parquet": (_corrupt_parquet, "a.parquet is not readable Parquet"),
    "parquet_without_rows": (lambda f: pq.write_table(pa.table({"key": pa.array([], pa.string()),
                                                                "image": pa.array([], pa.binary())}), f / "a.parquet"),
                             "holds no rows"),
    "only_files_spark_skips": (lambda f: [(f / ".hidden.jpg").write_bytes(_jpeg()), (f / "_tmp").mkdir(),
                                          (f / "_tmp" / "a.jpg").write_bytes(_jpeg())], "holds no images"),
}


@pytest.mark.parametrize("case", list(BROKEN_SETS))
def test_unreadable_evaluation_sets_are_refused_before_spark_starts(curated_out, tmp_path, refused_before_spark,
                                                                    case):
    main = functools.partial(run_stage_job, "decontaminate")
    build, says = BROKEN_SETS[case]
    folder = tmp_path / "evals"
    folder.mkdir()
    build(folder)
    err = refused_before_spark(main, ["--input", curated_out / "stages" / "filter", "--output", tmp_path / "o",
                                      "--set", f"decontaminate.sets=[{folder}]",
                                      "--set", f"filter.model={SHAPES_CLIP}"], tmp_path)
    assert err.startswith("capfilt: error: decontaminate.sets: ") and says in err, err
    assert not (tmp_path / "o").exists()


def test_curate_refuses_an_unreadable_evaluation_set_before_downloading(curate_args, tmp_path, refused_before_spark):
    """curate used to download, caption and filter first, then fail with a traceback and an .inprogress."""
    from capfilt.jobs.curate import main
    folder = tmp_path / "evals"
    folder.mkdir()
    _random_bytes_tar(folder)
    out = tmp_path / "out"
    err = refused_before_spark(main, [*curate_args, "--output", out, "--set", f"decontaminate.sets=[{folder}]"],
                               tmp_path)
    assert "000.tar is not a readable tar" in err and not (out / "stages").exists()


def test_readable_tars_pass_the_driver_check_plain_and_compressed(tmp_path):
    from capfilt.pipelines.image_sets import check_sets
    _tar(tmp_path / "plain.tar", [("a.jpg", _jpeg()), ("a.txt", b"a caption")])
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:
        info = tarfile.TarInfo("b.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    check_sets([str(tmp_path)], "decontaminate.sets")


@pytest.mark.slow
def test_an_evaluation_set_where_no_image_decodes_is_an_error_not_a_silent_pass(tmp_path, spark):
    """Files named .jpg that are not images pass the driver check (decoding them is the workers' job); with
    nothing embedded, every copy would pass: the stage stops instead."""
    from capfilt.pipelines.config import load_config
    from capfilt.pipelines.image_sets import embed_sets
    folder = tmp_path / "evals"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(b"not a picture")
    cfg = load_config(None, [f"decontaminate.sets=[{folder}]", f"filter.model={SHAPES_CLIP}", "download.image_size=64"])
    with pytest.raises(ValueError, match="decontaminate.sets: none of the 2 images decodes as an image"):
        embed_sets(spark, cfg.decontaminate.sets, "decontaminate.sets", cfg.filter, str(tmp_path / "embedded"),
                   cfg.download)
