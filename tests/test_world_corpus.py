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
