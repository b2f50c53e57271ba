"""The annotated split and the noisy web corpus of the shapes world."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from capfilt.world import cli
from capfilt.world.captions import N_PHRASINGS, describe, parse
from capfilt.world.corpus import (
    FAULTS, KINDS, LONG_CAPTION_CHARS, VARIANTS, make_annotated, make_web_corpus, write_metadata,
)
from capfilt.world.scene import COLOUR_RGB, Scene, attribute_differences

BASE_URL = "http://127.0.0.1:8123"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web")
    make_web_corpus(out, 500, seed=11)
    return out


@pytest.fixture(scope="module")
def truth(corpus) -> list[dict]:
    return pq.read_table(corpus / "truth.parquet").to_pylist()


def rows_of(truth, kind=None, fault=None, variant=None) -> list[dict]:
    return [r for r in truth if (kind is None or r["kind"] == kind) and (fault is None or r["fault"] == fault)
            and (variant is None or r["variant"] == variant)]


def scene_of(row) -> Scene:
    return Scene.from_json(row["scene"])


def file_bytes(corpus: Path, row) -> bytes:
    return (corpus / "site" / row["file"]).read_bytes()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_kind_fault_and_variant_appears_and_summary_matches_sidecar(corpus, truth):
    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["n"] == len(truth) == 500 and summary["seed"] == 11
    assert Counter(r["kind"] for r in truth) == Counter({k: v for k, v in summary["kinds"].items() if v})
    assert set(summary["kinds"]) == set(KINDS) and all(summary["kinds"][k] > 0 for k in KINDS)
    assert {r["fault"] for r in truth} - {None} == set(FAULTS)
    assert {r["variant"] for r in truth} - {None} == set(VARIANTS)
    assert all(r["kind"] == "clean" and r["fault"] is None for r in truth if r["variant"])
    n_faults = sum(r["kind"] == "fault" for r in truth)
    assert len(FAULTS) <= n_faults <= 0.06 * len(truth)


def test_noise_share_follows_the_parameter(corpus, truth):
    plain = [r for r in truth if r["fault"] is None and r["variant"] is None]
    assert abs(sum(not r["aligned"] for r in plain) / len(plain) - 0.45) < 0.02
    summary = json.loads((corpus / "corpus.json").read_text())
    assert 0.40 <= summary["noise_share"] <= 0.50


def test_a_small_corpus_still_has_every_fault_and_a_tiny_one_is_refused(tmp_path):
    summary = make_web_corpus(tmp_path / "small", 40, seed=1, noise=0.3, duplicates=0.0)
    assert all(summary["faults"][f] == 1 for f in FAULTS)
    assert summary["kinds"]["duplicate_image"] == 0
    with pytest.raises(ValueError, match="too small"):
        make_web_corpus(tmp_path / "tiny", 20, seed=1)
    assert make_web_corpus(tmp_path / "bare", 12, seed=1, faults=(), variants=())["kinds"]["fault"] == 0


def test_existing_corpus_is_replaced_only_when_asked(tmp_path):
    make_web_corpus(tmp_path, 40, seed=1)
    write_metadata(tmp_path, BASE_URL)
    with pytest.raises(FileExistsError):
        make_web_corpus(tmp_path, 40, seed=2)
    make_web_corpus(tmp_path, 50, seed=2, overwrite=True)
    assert not (tmp_path / "metadata.parquet").exists()  # it described the old corpus
    truth = pq.read_table(tmp_path / "truth.parquet")
    assert truth.num_rows == 50
    files = {"img/" + p.name for p in (tmp_path / "site/img").iterdir()}
    assert files == set(truth.column("file").drop_null().to_pylist())


def test_aligned_rows_describe_their_image(truth):
    for row in rows_of(truth, "clean"):
        if row["variant"] is None:
            scene = scene_of(row)
            assert row["caption"].decode() in {describe(scene, p) for p in range(N_PHRASINGS)}
    for row in rows_of(truth, "web_phrasing"):
        assert parse(row["caption"].decode()) == scene_of(row) and row["aligned"]


def test_wrong_attribute_captions_are_off_by_exactly_one_attribute(truth):
    rows = rows_of(truth, "wrong_attribute")
    assert rows
    for row in rows:
        assert attribute_differences(parse(row["caption"].decode()), scene_of(row)) == 1
        assert row["aligned"] is False


def test_generic_and_spam_captions_describe_nothing(truth):
    for row in rows_of(truth, "generic") + rows_of(truth, "spam"):
        assert parse(row["caption"].decode()) is None and row["aligned"] is False


def test_swapped_captions_belong_to_another_image_with_another_scene(truth):
    captions = {}
    for row in truth:
        if row["kind"] in ("clean", "web_phrasing") and row["fault"] is None:
            captions.setdefault(row["caption"], []).append(row)
    for row in rows_of(truth, "swapped"):
        owners = captions[row["caption"]]
        assert all(o["scene"] != row["scene"] for o in owners)
        assert row["aligned"] is False


def test_duplicates_point_at_their_original(corpus, truth):
    by_id = {r["id"]: r for r in truth if r["fault"] != "duplicate_id"}
    for row in rows_of(truth, "duplicate_image"):
        original = by_id[row["duplicate_of"]]
        assert file_bytes(corpus, row) == file_bytes(corpus, original) and row["url_path"] != original["url_path"]
        assert row["scene"] == original["scene"]
    for row in rows_of(truth, "near_duplicate_image"):
        original = by_id[row["duplicate_of"]]
        mine, theirs = (Image.open(io.BytesIO(file_bytes(corpus, r))).convert("RGB") for r in (row, original))
        assert file_bytes(corpus, row) != file_bytes(corpus, original) and row["scene"] == original["scene"]
        difference = np.abs(np.asarray(mine.resize((64, 64)), float) - np.asarray(theirs, float)).mean()
        assert difference < 12
    for row in rows_of(truth, "near_duplicate_caption"):
        original = by_id[row["duplicate_of"]]
        mine, theirs = row["caption"].decode().split(" "), original["caption"].decode().split(" ")
        common = 0
        while common < min(len(mine), len(theirs)) and mine[common] == theirs[common]:
            common += 1
        assert 1 <= max(len(mine), len(theirs)) - common <= 2  # one or two words appended or dropped
        assert row["scene"] != original["scene"] and row["file"] != original["file"]


def test_ids_are_unique_except_the_duplicate_id_fault(truth):
    counts = Counter(r["id"] for r in truth)
    first_holder = {}
    for row in truth:
        first_holder.setdefault(row["id"], row)
    for row in rows_of(truth, fault="duplicate_id"):
        assert counts[row["id"]] == 2 and row["duplicate_of"] == row["id"]
        assert first_holder[row["id"]]["fault"] is None  # the id is reused from an earlier, plain row
    assert sum(c - 1 for c in counts.values()) == len(rows_of(truth, fault="duplicate_id"))


def test_content_faults_are_broken_in_the_promised_way(corpus, truth):
    def one(fault):
        return file_bytes(corpus, rows_of(truth, fault=fault)[0])

    assert one("empty_body") == b""
    assert one("not_image").lstrip().lower().startswith(b"<!doctype html")
    truncated = one("truncated")
    assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated)).load()
    assert Image.open(io.BytesIO(one("tiny"))).size == (4, 4)
    bomb = one("bomb")
    assert len(bomb) < 10_000 and struct.unpack(">II", bomb[16:24]) == (40_000, 40_000)
    for fault in ("http_404", "refused", "reset", "redirect_loop", "not_image", "truncated", "empty_body", "bomb"):
        assert all(r["scene"] is None for r in rows_of(truth, fault=fault)), fault


def test_image_variants_decode_in_their_odd_modes(corpus, truth):
    def opened(variant):
        row = rows_of(truth, variant=variant)[0]
        return row, Image.open(corpus / "site" / row["file"])

    assert opened("cmyk_jpeg")[1].mode == "CMYK"
    assert opened("greyscale_jpeg")[1].mode == "L"
    assert file_bytes(corpus, rows_of(truth, variant="png_16bit")[0])[24] == 16  # IHDR bit depth
    palette = opened("palette_png_transparent")[1]
    assert palette.mode == "P" and "transparency" in palette.info
    rgba = opened("rgba_png")[1]
    assert rgba.mode == "RGBA" and np.asarray(rgba)[:, :, 3].min() == 0
    assert opened("animated_gif")[1].n_frames == 2
    row, rotated = opened("exif_rotated_jpeg")
    assert rotated.getexif()[0x0112] == 6
    upright = np.asarray(ImageOps.exif_transpose(rotated).convert("RGB"), dtype=np.int32)
    first = scene_of(row).objects[0]
    mask = np.abs(upright - np.array(COLOUR_RGB[first.colour])).sum(axis=2) < 60
    if len(scene_of(row).objects) == 2 and scene_of(row).objects[1].colour != first.colour:
        assert mask[:, 32:].sum() == 0 and mask[:, :32].sum() > 0  # upright again: first object on the left


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_web_corpus(tmp_path / name, 120, seed=seed)
        write_metadata(tmp_path / name, BASE_URL)
        make_annotated(tmp_path / name, 30, seed=seed)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    a, c = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "c")
    assert a["truth.parquet"] != c["truth.parquet"] and a["annotated.parquet"] != c["annotated.parquet"]


def test_metadata_has_full_unique_urls_and_carries_extra_columns(corpus, truth):
    table = pq.read_table(write_metadata(corpus, BASE_URL + "/"))
    assert table.column_names == ["id", "url", "caption", "source_site", "license", "width", "height"]
    assert table.schema.field("caption").type == pa.string()
    urls = table.column("url").to_pylist()
    assert len(set(urls)) == len(urls) == len(truth)
    for url, row in zip(urls, truth):
        if row["url_path"].startswith("/"):
            assert url == BASE_URL + row["url_path"]
        else:  # refused and malformed URLs are written as they are
            assert url == row["url_path"] and row["fault"] in ("refused", "malformed_url")


def test_invalid_utf8_caption_is_written_raw_in_every_format(corpus, truth):
    index = next(i for i, r in enumerate(truth) if r["fault"] == "invalid_utf8_caption")
    captions = pq.read_table(write_metadata(corpus, BASE_URL)).column("caption")
    with pytest.raises(pa.ArrowInvalid):
        captions.validate(full=True)
    with pytest.raises(pa.ArrowInvalid):
        captions.slice(index, 1).validate(full=True)
    captions.slice(0, index).validate(full=True)  # only that row is invalid
    for fmt in ("csv", "jsonl"):
        raw = write_metadata(corpus, BASE_URL, fmt=fmt).read_bytes()
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        assert truth[index]["caption"] in raw


def test_csv_and_jsonl_hold_the_same_rows_as_parquet(corpus, truth):
    parquet = pq.read_table(write_metadata(corpus, BASE_URL)).drop_columns(["caption"]).to_pylist()
    text_of = {fmt: write_metadata(corpus, BASE_URL, fmt=fmt).read_bytes().decode("utf-8", "surrogateescape")
               for fmt in ("csv", "jsonl")}
    jsonl = [json.loads(line) for line in text_of["jsonl"].splitlines()]
    csv_rows = list(csv.DictReader(io.StringIO(text_of["csv"], newline="")))
    assert len(jsonl) == len(csv_rows) == len(parquet)
    for p, j, c, t in zip(parquet, jsonl, csv_rows, truth):
        assert p["id"] == j["id"] == c["id"] and p["url"] == j["url"] == c["url"]
        assert j["width"] == p["width"] and c["width"] == ("" if p["width"] is None else str(p["width"]))
        assert j["caption"].encode("utf-8", "surrogateescape") == t["caption"]
        assert c["caption"].encode("utf-8", "surrogateescape") == t["caption"]
    lengths = {t["fault"]: len(t["caption"]) for t in truth if t["fault"] in ("empty_caption", "long_caption")}
    assert lengths == {"empty_caption": 0, "long_caption": LONG_CAPTION_CHARS}


def test_annotated_split_has_clean_captions_of_the_true_scene(tmp_path):
    table = pq.read_table(make_annotated(tmp_path, 40, seed=3))
    assert table.schema.names == ["image_id", "image", "width", "height", "captions", "scene"]
    assert table.schema.field("captions").type == pa.list_(pa.string())
    for row in table.to_pylist():
        scene = Scene.from_json(row["scene"])
        assert len(row["captions"]) == N_PHRASINGS and all(parse(c) == scene for c in row["captions"])
        assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"]) == (64, 64)


def test_cli_generate_writes_corpus_and_reports_the_mix(tmp_path, capsys):
    assert cli.main(["generate", "--out", str(tmp_path), "--n", "60", "--seed", "2", "--annotated", "10"]) == 0
    printed = capsys.readouterr().out
    assert "truth.parquet" in printed and '"swapped"' in printed
    assert pq.read_table(tmp_path / "annotated.parquet").num_rows == 10
    assert json.loads((tmp_path / "corpus.json").read_text())["n"] == 60
    with pytest.raises(SystemExit):
        cli.main(["generate", "--n", "60"])  # --out is required


def test_cli_generate_into_an_existing_corpus_names_the_overwrite_flag(tmp_path, capsys):
    from capfilt.jobs.cli import main as capfilt
    args = ["world", "generate", "--out", str(tmp_path), "--n", "40"]
    assert capfilt(args) == 0
    before = tree_hashes(tmp_path)
    capsys.readouterr()
    assert capfilt(args + ["--seed", "3"]) == 2
    assert capsys.readouterr().err == (f"capfilt world: error: {tmp_path} already holds a corpus: "
                                       f"pass --overwrite to replace it\n")
    assert tree_hashes(tmp_path) == before
    assert capfilt(args + ["--seed", "3", "--overwrite"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--noise", "nan"], "--noise must be a share between 0 and 1, not nan"),
    (["--fault-rate", "inf"], "--fault-rate must be a share between 0 and 1, not inf"),
    (["--duplicates", "-0.1"], "--duplicates must be a share between 0 and 1, not -0.1"),
    (["--annotated", "-3"], "--annotated must be 0 or more, not -3"),
    (["--slow-ms", "-1"], "--slow-ms must be 0 or more, not -1"),
    (["--seed", "-2"], "--seed must be 0 or more, not -2"),
    (["--image-size", "2048-512"], "--image-size takes N or LOW-HIGH with values from 16 to 4096, not '2048-512'"),
    (["--jpeg-quality", "high"], "--jpeg-quality takes N or LOW-HIGH with values from 1 to 100, not 'high'"),
])
def test_cli_generate_refuses_bad_numbers_in_one_line(tmp_path, capsys, args, message):
    assert cli.main(["generate", "--out", str(tmp_path / "c"), "--n", "40", *args]) == 2
    assert capsys.readouterr().err == f"capfilt world: error: {message}\n"
    assert not (tmp_path / "c").exists()


def test_cli_generate_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli.main(["generate", "--out", str(tmp_path / "f"), "--n", "40"]) == 2
    assert capsys.readouterr().err == f"capfilt world: error: --out {tmp_path / 'f'} exists and is not a folder\n"


def test_a_web_size_corpus_draws_each_image_s_size_and_quality(tmp_path):
    assert cli.main(["generate", "--out", str(tmp_path), "--n", "40", "--seed", "3", "--image-size", "512-1024",
                     "--jpeg-quality", "60-95"]) == 0
    truth = pq.read_table(tmp_path / "truth.parquet").to_pylist()
    sides, qualities = [], []
    for row in truth:
        if row["kind"] in ("clean", "web_phrasing") and row["fault"] is None and row["variant"] is None:
            image = Image.open(tmp_path / "site" / row["file"])
            assert image.width == image.height and 512 <= image.width <= 1024
            assert row["width"] in (None, image.width, 640, 1024, 256)  # the page's claim: mostly the truth
            sides.append(image.width)
            qualities.append(image.quantization[0][0])  # the first luma step grows as quality falls
    assert len(set(sides)) > len(sides) // 2 and len(set(qualities)) > 3


# --- opt-in features: watermarks, an evaluation set and planted copies of it ----------------------

ORIGINAL_TRUTH_COLUMNS = ["id", "url_path", "kind", "fault", "variant", "scene", "aligned", "duplicate_of", "file",
                          "caption", "source_site", "license", "width", "height"]
# sha256 over site/, corpus.json and the original truth columns of make_web_corpus(n=120, seed=5), as the
# generator wrote them before watermarks and planted copies existed (commit 5d873b6).
DEFAULT_CORPUS_DIGEST = "ee9a8b23b0c8151df7f0364496fc49403581d8cc16b6799540cf47c476204b50"


def corpus_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted((root / "site").rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(root)).encode())
            digest.update(hashlib.sha256(p.read_bytes()).digest())
    digest.update((root / "corpus.json").read_bytes())
    for row in pq.read_table(root / "truth.parquet", columns=ORIGINAL_TRUTH_COLUMNS).to_pylist():
        digest.update(repr(sorted(row.items())).encode())
    return digest.hexdigest()


def without(row: dict, *keys) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("marked")
    make_web_corpus(out, 500, seed=11, watermark_rate=0.2)
    return out


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    from capfilt.world.evalset import make_eval_set
    out = tmp_path_factory.mktemp("eval") / "wds"
    make_eval_set(out, 60, seed=4, fmt="wds", shard_size=25)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory, eval_set) -> Path:
    out = tmp_path_factory.mktemp("planted")
    make_web_corpus(out, 500, seed=11, eval_set=eval_set, eval_rate=0.04)
    return out


def test_without_the_opt_ins_a_corpus_is_what_it_was_before_them(tmp_path, truth):
    make_web_corpus(tmp_path / "a", 120, seed=5)
    assert corpus_digest(tmp_path / "a") == DEFAULT_CORPUS_DIGEST
    make_web_corpus(tmp_path / "b", 120, seed=5, watermark_rate=0.0, eval_set=None, eval_rate=0.5)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert "watermarked" not in summary and "watermark_rate" not in summary["params"]
    assert not any(r["watermark"] for r in truth) and all(r["eval_id"] is None for r in truth)


def test_watermarks_mark_about_the_rate_and_change_no_other_row_or_file(tmp_path, corpus, truth, marked):
    marks = pq.read_table(marked / "truth.parquet").to_pylist()
    assert [without(r, "watermark") for r in marks] == [without(r, "watermark") for r in truth]
    with_image = [r for r in marks if r["scene"] is not None]
    share = sum(r["watermark"] for r in with_image) / len(with_image)
    assert 0.15 <= share <= 0.25, share
    assert json.loads((marked / "corpus.json").read_text())["watermarked"] == sum(r["watermark"] for r in marks)
    assert not any(r["watermark"] for r in marks if r["scene"] is None)  # no image, nothing to see it on
    for row in marks:
        if row["file"] is not None:
            same = file_bytes(corpus, row) == file_bytes(marked, row)
            assert same != row["watermark"], row["id"]
    by_id = {r["id"]: r for r in marks if r["fault"] != "duplicate_id"}
    for row in marks:  # an exact or near copy shows what its original shows
        if row["kind"] in ("duplicate_image", "near_duplicate_image"):
            assert row["watermark"] == by_id[row["duplicate_of"]]["watermark"]
    make_web_corpus(tmp_path, 500, seed=11, watermark_rate=0.4)
    more = pq.read_table(tmp_path / "truth.parquet", columns=["watermark"]).column(0).to_pylist()
    assert all(b for a, b in zip((r["watermark"] for r in marks), more) if a)  # a higher rate marks a superset


def test_a_marked_image_keeps_its_scene_visible(corpus, marked):
    rows = [r for r in pq.read_table(marked / "truth.parquet").to_pylist()
            if r["watermark"] and r["kind"] == "clean" and r["variant"] is None and r["fault"] is None]
    differences = []
    for row in rows:
        clean, mark = (np.asarray(Image.open(root / "site" / row["file"]).convert("RGB"), float) for root in (corpus, marked))
        differences.append(np.abs(clean - mark).max(axis=2))
    changed = np.mean([(d > 10).mean() for d in differences])
    assert 0.02 < changed < 0.6, changed  # visible, yet most of the image is untouched


def test_the_eval_set_has_the_same_ids_and_bytes_in_every_format(tmp_path, eval_set):
    import webdataset

    from capfilt.world.evalset import MANIFEST, eval_ids, make_eval_set, read_eval_set
    for fmt in ("folder", "parquet"):
        make_eval_set(tmp_path / fmt, 60, seed=4, fmt=fmt)
    folder, parquet, wds = (read_eval_set(p) for p in (tmp_path / "folder", tmp_path / "parquet", eval_set))
    assert [(i.id, i.jpeg) for i in folder] == [(i.id, i.jpeg) for i in parquet] == [(i.id, i.jpeg) for i in wds]
    assert [i.id for i in folder] == eval_ids(60) and all(i.scene is not None for i in folder)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == sorted([f"{k}.jpg" for k in eval_ids(60)] + [MANIFEST])
    assert pq.read_table(tmp_path / "parquet" / "eval.parquet").column_names == ["key", "image"]
    tars = sorted(str(p) for p in eval_set.glob("*.tar"))
    assert len(tars) == 3
    samples = list(webdataset.WebDataset(tars, shardshuffle=False))
    assert [(s["__key__"], s["jpg"]) for s in samples] == [(i.id, i.jpeg) for i in folder]
    manifest = json.loads((eval_set / MANIFEST).read_text())
    assert manifest["seed"] == 4 and manifest["format"] == "wds" and len(manifest["images"]) == 60
    scene = Scene.from_json(manifest["images"][0]["scene"])
    assert Image.open(io.BytesIO(folder[0].jpeg)).size == (64, 64) and scene == folder[0].scene


def test_the_eval_set_is_its_own_stream_and_refuses_to_overwrite(tmp_path, eval_set):
    from capfilt.world.evalset import make_eval_set, read_eval_set
    make_eval_set(tmp_path / "again", 60, seed=4, fmt="wds", shard_size=25)
    assert tree_hashes(tmp_path / "again") == tree_hashes(eval_set)
    with pytest.raises(FileExistsError):
        make_eval_set(tmp_path / "again", 10, seed=5, fmt="folder")
    make_eval_set(tmp_path / "again", 10, seed=5, fmt="folder", overwrite=True)
    assert sorted(p.suffix for p in (tmp_path / "again").iterdir()) == [".jpg"] * 10 + [".json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_eval_set(tmp_path / "other", 10, seed=5)
    # the same seed's corpus and annotated split draw other images
    make_web_corpus(tmp_path / "web", 60, seed=4)
    make_annotated(tmp_path / "web", 60, seed=4)
    ours = {i.jpeg for i in read_eval_set(eval_set)}
    theirs = {p.read_bytes() for p in (tmp_path / "web" / "site" / "img").iterdir()}
    theirs |= set(pq.read_table(tmp_path / "web" / "annotated.parquet").column("image").to_pylist())
    assert not ours & theirs


def thumbnail(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((16, 16), Image.Resampling.BOX), float)


def test_planted_rows_are_modified_copies_of_evaluation_images(corpus, truth, planted, eval_set):
    from capfilt.world.evalset import read_eval_set
    images = {i.id: i for i in read_eval_set(eval_set)}
    rows = pq.read_table(planted / "truth.parquet").to_pylist()
    own = [r for r in rows if r["eval_id"] is not None and r["kind"] not in ("duplicate_image", "near_duplicate_image")]
    assert len(own) == round(0.04 * 500)
    summary = json.loads((planted / "corpus.json").read_text())
    assert summary["planted"] == sum(r["eval_id"] is not None for r in rows) and summary["params"]["eval_rate"] == 0.04
    names = sorted(images)
    thumbs = np.stack([thumbnail(images[k].jpeg) for k in names])
    nearest_is_own = 0
    for row in own:
        data, original = file_bytes(planted, row), images[row["eval_id"]]
        copy = Image.open(io.BytesIO(data))
        assert data != original.jpeg and copy.format == "JPEG"
        assert 0.6 * 0.84 * 64 - 1 <= min(copy.size) and max(copy.size) <= 1.5 * 64 + 1, copy.size
        assert copy.quantization[0] != Image.open(io.BytesIO(original.jpeg)).quantization[0]  # another quality
        assert row["scene"] == original.scene.to_json() and row["fault"] is None and row["variant"] is None
        assert row["aligned"] == (parse(row["caption"].decode()) == original.scene)
        assert (row["width"], row["height"]) in ((None, None), copy.size, (640, 480), (1024, 768), (256, 256))
        distances = ((thumbs - thumbnail(data)) ** 2).mean(axis=(1, 2, 3))
        nearest_is_own += names[int(distances.argmin())] == row["eval_id"]
    assert nearest_is_own >= 0.8 * len(own), nearest_is_own
    # Every other row is as it was, but for swapped rows that borrowed a planted row's caption.
    planted_captions = {r["caption"] for r in own}
    for before, after in zip(truth, rows):
        if after["eval_id"] is None and before != after:
            assert after["kind"] == "swapped" and after["caption"] in planted_captions
        if after["eval_id"] is None and after["file"] is not None:
            assert file_bytes(corpus, before) == file_bytes(planted, after)


def test_planting_from_bytes_without_scenes_leaves_scene_unknown(tmp_path, eval_set):
    from capfilt.world.evalset import read_eval_set
    pairs = [(i.id, i.jpeg) for i in read_eval_set(eval_set)][:5]
    summary = make_web_corpus(tmp_path, 200, seed=3, eval_set=pairs, eval_rate=0.05, watermark_rate=0.3)
    rows = pq.read_table(tmp_path / "truth.parquet").to_pylist()
    own = [r for r in rows if r["eval_id"] and r["kind"] not in ("duplicate_image", "near_duplicate_image")]
    assert len(own) == 10 and {r["eval_id"] for r in own} <= {k for k, _ in pairs}
    assert all(r["scene"] is None and r["aligned"] is None and r["file"] for r in own)
    assert summary["params"]["eval_set"] == "5 images" and summary["watermarked"] > 0
    with pytest.raises(ValueError, match="no images"):
        make_web_corpus(tmp_path / "none", 200, seed=3, eval_set=[])


def test_cli_writes_an_eval_set_and_a_corpus_with_watermarks_and_planted_copies(tmp_path, capsys):
    from capfilt.jobs.cli import main as capfilt
    assert capfilt(["world", "eval-set", "--out", str(tmp_path / "eval"), "--n", "30", "--seed", "2",
                    "--format", "parquet"]) == 0
    assert "30 images (parquet)" in capsys.readouterr().out
    assert capfilt(["world", "generate", "--out", str(tmp_path / "c"), "--n", "200", "--seed", "2",
                    "--watermark-rate", "0.25", "--eval-set", str(tmp_path / "eval"), "--eval-rate", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert '"watermarked"' in printed and '"planted"' in printed
    rows = pq.read_table(tmp_path / "c" / "truth.parquet").to_pylist()
    assert sum(r["eval_id"] is not None for r in rows) >= 10 and any(r["watermark"] for r in rows)
    assert capfilt(["world", "eval-set", "--out", str(tmp_path / "eval"), "--n", "30"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--watermark-rate", "1.5"], "--watermark-rate must be a share between 0 and 1, not 1.5"),
    (["--eval-rate", "nan"], "--eval-rate must be a share between 0 and 1, not nan"),
    (["--eval-set", "/nonexistent/eval"], "--eval-set /nonexistent/eval does not exist: write one with "
                                          "`eval-set --out DIR --n N`"),
])
def test_cli_generate_refuses_bad_opt_ins_in_one_line(tmp_path, capsys, args, message):
    assert cli.main(["generate", "--out", str(tmp_path / "c"), "--n", "40", *args]) == 2
    assert capsys.readouterr().err == f"capfilt world: error: {message}\n"
    assert not (tmp_path / "c").exists()


def test_cli_eval_set_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    assert cli.main(["eval-set", "--out", str(tmp_path / "e"), "--n", "0"]) == 2
    assert capsys.readouterr().err == "capfilt world: error: --n must be 1 or more, not 0\n"
    (tmp_path / "f").write_text("x")
    assert cli.main(["eval-set", "--out", str(tmp_path / "f"), "--n", "3"]) == 2
    assert capsys.readouterr().err == f"capfilt world: error: {tmp_path / 'f'} exists and is not a folder\n"


def test_a_skewed_world_follows_zipfs_law_over_colour_and_shape_concepts(tmp_path):
    """--zipf 1.2: corpus.json ranks the 24 concepts; the rows drawn from scenes show each concept about as
    often as its probability says (within 4 standard errors), the head far more than the tail; exponent 0
    is the uniform corpus byte for byte; a negative or NaN exponent is refused."""
    from capfilt.world.scene import CONCEPTS
    summary = make_web_corpus(tmp_path / "skewed", 3000, seed=5, zipf=1.2)
    ranking = summary["concepts"]
    assert sorted((c, s) for c, s, _ in ranking) == sorted(CONCEPTS)
    probs = [p for _, _, p in ranking]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5 and probs[0] / probs[-1] > 40
    truth = pq.read_table(tmp_path / "skewed" / "truth.parquet").to_pylist()
    seen = Counter((o.colour, o.shape) for r in truth if r["kind"] in ("clean", "web_phrasing") and r["scene"]
                               for o in Scene.from_json(r["scene"]).objects)
    total = sum(seen.values())
    for colour, shape, p in ranking:
        assert abs(seen[(colour, shape)] / total - p) <= 4 * (p * (1 - p) / total) ** 0.5 + 0.003, (colour, shape)
    make_web_corpus(tmp_path / "flat", 120, seed=5, zipf=0.0)
    assert corpus_digest(tmp_path / "flat") == DEFAULT_CORPUS_DIGEST
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="zipf must be an exponent"):
            make_web_corpus(tmp_path / "bad", 120, seed=5, zipf=bad)
