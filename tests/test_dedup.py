"""The dedup stage's policy (pipelines/dedup.py) and job (jobs/dedup.py): which rows go, why, and who survives."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.pipelines.config import DedupSettings, load_config
from capfilt.pipelines.dedup import dedup
from capfilt.schemas import CURATED, REJECTS, SCORED
from capfilt.udfs.clip_scores import embedding_bytes
from capfilt.world.scene import Scene, encode_jpeg, render
from helpers import encoded


def _row(uid, image: bytes, caption: str, embedding, score: float, size=(64, 64), synthetic=()):
    candidates = [{"text": caption, "source": "web", "score": score, "kept": True}]
    candidates += [{"text": t, "source": "synthetic", "score": score - 0.01, "kept": True} for t in synthetic]
    return {"uid": uid, "url": f"http://127.0.0.1/{uid}.jpg", "caption": caption, "image": image,
            "width": size[0], "height": size[1], "original_width": size[0], "original_height": size[1],
            "sha256": hashlib.sha256(image).hexdigest(), "synthetic_captions": list(synthetic),
            "candidates": candidates, "best_score": score, "image_embedding": embedding_bytes(embedding),
            "caption_primary": caption}


def _scored(spark, rows):
    schema = SCORED.spark_schema().add("caption_primary", "string")
    return spark.createDataFrame(rows, schema)


def _unit(seed: int, dim: int = 64):
    v = np.random.default_rng(seed).normal(size=dim)
    return v / np.linalg.norm(v)


def _toward(base, other, cosine: float):
    """A unit vector at the given cosine from base, in the plane of base and other."""
    ortho = other - (other @ base) * base
    ortho /= np.linalg.norm(ortho)
    return cosine * base + np.sqrt(1 - cosine ** 2) * ortho


def _picture(scene_json: str, seed: int, quality: int = 90, side: int = 64) -> bytes:
    image = render(Scene.from_json(scene_json), 64, np.random.default_rng(seed))
    if side != 64:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return encode_jpeg(image, quality)


RED_CIRCLE = '{"background":"white","objects":[{"colour":"red","shape":"circle","size":"large"}]}'
BLUE_SQUARE = '{"background":"black","objects":[{"colour":"blue","shape":"square","size":"large"}]}'
GREEN_CROSS = '{"background":"gray","objects":[{"colour":"green","shape":"cross","size":"small"}]}'


@pytest.fixture(scope="module")
def planted(spark):
    """Hand-made groups, one per piece of evidence, with embeddings placed where the policy must decide."""
    e = {k: _unit(i) for i, k in enumerate("abcdefgh")}
    red, blue, green = _picture(RED_CIRCLE, 1), _picture(BLUE_SQUARE, 2), _picture(GREEN_CROSS, 3)
    rows = [
        # same bytes + same caption (modulo case/space): exact_duplicate; the higher score survives
        _row("x1", red, "A red circle on white", e["a"], 0.80),
        _row("x2", red, "a red  circle on WHITE ", e["a"], 0.90, synthetic=("a large red circle",)),
        # same bytes, another caption: duplicate_image
        _row("x3", red, "crimson disc, white backdrop", e["a"], 0.70),
        # re-encoded and resized copy: near_duplicate_image; the tie on score goes to the larger image
        _row("n1", blue, "a blue square on black", e["b"], 0.85),
        _row("n2", _picture(BLUE_SQUARE, 2, quality=60, side=80), "blue square photo", _toward(e["b"], e["c"], 0.995),
             0.85, size=(80, 80)),
        # one template caption, different pictures: not duplicates
        _row("t1", green, "wallpaper hd free download shapes art", e["d"], 0.60),
        _row("t2", _picture(RED_CIRCLE, 9), "wallpaper hd free download shapes art", e["e"], 0.60),
        # near-duplicate captions, similar (not near-identical) embeddings, thumbnails that agree (a
        # re-encoded, resized copy): near_duplicate_caption
        _row("c1", _picture(GREEN_CROSS, 4), "small green cross on a grey background, stock photo", e["f"], 0.75),
        _row("c2", _picture(GREEN_CROSS, 4, quality=60, side=80),
             "small green cross on a grey background, stock photo hd", _toward(e["f"], e["g"], 0.93), 0.74,
             size=(80, 80)),
        # the same, but another render of the scene (objects moved a little): another picture, kept
        _row("c3", _picture(GREEN_CROSS, 5), "small green cross on a grey background, stock photo hd",
             _toward(e["f"], e["g"], 0.93), 0.73),
        # near-duplicate captions, different images: kept
        _row("d1", _picture(BLUE_SQUARE, 6), "small green cross on a grey background, stock image", e["h"], 0.50),
    ]
    df = _scored(spark, rows)
    curated, rejects = dedup(df, DedupSettings(ngram=2, caption_threshold=0.5), seed=0)
    CURATED.validate(curated, where="dedup output")
    REJECTS.validate(rejects, where="dedup rejects")
    return rows, curated.toPandas().set_index("uid"), rejects.toPandas().set_index("uid")


def test_each_piece_of_evidence_drops_with_its_reason_and_names_the_survivor(planted):
    rows, curated, rejects = planted
    assert rejects.loc[["x1", "x3", "n1", "c2"], "reason"].tolist() == [
        "exact_duplicate", "duplicate_image", "near_duplicate_image", "near_duplicate_caption"]
    assert rejects.loc[["x1", "x3", "n1", "c2"], "duplicate_of"].tolist() == ["x2", "x2", "n2", "c1"]
    assert set(rejects.stage) == {"dedup"}
    assert set(curated.index) == {"x2", "n2", "t1", "t2", "c1", "c3", "d1"}
    assert len(curated) + len(rejects) == len(rows)


def test_the_survivor_inherits_the_kept_captions_of_the_rows_it_replaces(planted):
    _, curated, _ = planted
    candidates = {(c["text"], c["source"]) for c in curated.loc["x2", "candidates"]}
    assert ("crimson disc, white backdrop", "inherited_web") in candidates
    assert ("A red circle on white", "inherited_web") not in candidates  # the survivor's own text, in other case
    assert sum(text == "crimson disc, white backdrop" for text, _ in candidates) == 1
    assert curated.loc["x2", "caption_primary"] == "a red  circle on WHITE "
    assert [c["source"] for c in curated.loc["t1", "candidates"]] == ["web"]


@pytest.mark.slow
def test_a_caption_cluster_cap_keeps_the_best_rows_of_a_template(spark):
    rows = [_row(f"s{i}", _picture(RED_CIRCLE if i % 2 else BLUE_SQUARE, 10 + i), "buy cheap shapes posters online now",
                 _unit(100 + i), 0.5 + i / 100) for i in range(6)]
    curated, rejects = dedup(_scored(spark, rows), DedupSettings(max_per_caption_cluster=2), seed=0)
    assert sorted(r.uid for r in curated.collect()) == ["s4", "s5"]
    dropped = {r.uid: (r.reason, r.duplicate_of) for r in rejects.collect()}
    assert dropped == {f"s{i}": ("caption_cluster_cap", "s5") for i in range(4)}


@pytest.mark.slow
def test_every_detector_can_be_switched_off(spark, planted):
    rows, _, _ = planted
    off = DedupSettings(exact=False, images=False, captions=False)
    curated, rejects = dedup(_scored(spark, rows), off, seed=0)
    assert curated.count() == len(rows) and rejects.count() == 0


@pytest.fixture(scope="module")
def shapes_rows(tmp_path_factory):
    """A shapes-world corpus with many planted duplicates, as the filter hands it to dedup: image
    bytes from the site, embeddings from the project's CLIP, and only the rows whose web caption
    passes the model card's threshold (dedup runs after the filter, which drops noisy captions).
    Returns (truth of the rows that passed, rows)."""
    import torch

    from capfilt.udfs.models import SHAPES_CLIP, load_clip
    from capfilt.world.corpus import make_web_corpus
    root = tmp_path_factory.mktemp("dedup-world")
    make_web_corpus(root, n=1000, seed=21, duplicates=0.3, faults=(), variants=())
    truth = pq.read_table(root / "truth.parquet").to_pandas()
    clip = load_clip(SHAPES_CLIP, "cpu")
    torch.set_num_threads(1)
    # As the download stage stores them: img2dataset's resizer at the demo's size and settings.
    from img2dataset.resizer import Resizer
    from capfilt.jobs.demo import shapes_world_settings
    settings = shapes_world_settings(load_config(None, [])).download
    resize = Resizer(image_size=settings.image_size, resize_mode=settings.resize_mode, resize_only_if_bigger=False,
                     encode_format=settings.encode_format, encode_quality=settings.encode_quality)
    blobs = [resize(io.BytesIO((root / "site" / f).read_bytes()))[0] for f in truth.file]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    embeddings = clip.encode_images(images)
    captions = [c.decode() for c in truth.caption]
    scores = (clip.encode_texts(captions) * embeddings).sum(1)
    from capfilt.jobs.demo import _card_threshold
    passed = scores >= _card_threshold(SHAPES_CLIP, 0.0)
    rows = [_row(uid, blob, caption, emb, float(score))
            for uid, blob, caption, emb, score, ok in zip(truth.id, blobs, captions, embeddings, scores, passed) if ok]
    return truth[passed].set_index("id"), rows


@pytest.fixture(scope="module")
def shapes_world(spark, shapes_rows):
    from capfilt.jobs.demo import shapes_world_settings
    truth, rows = shapes_rows
    curated, rejects = dedup(_scored(spark, rows), shapes_world_settings(load_config(None, [])).dedup, seed=0)
    return truth, curated.select("uid").toPandas(), rejects.toPandas().set_index("uid")


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["planted", "shapes world"])
def test_the_driver_path_finds_the_groups_and_clusters_the_spark_jobs_find(spark, planted, shapes_rows, corpus):
    import dataclasses

    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.pipelines.dedup import duplicate_groups
    rows, settings = ((planted[0], DedupSettings(ngram=2, caption_threshold=0.5)) if corpus == "planted" else
                      (shapes_rows[1], shapes_world_settings(load_config(None, [])).dedup))
    found = {}
    for path, limit in (("driver", len(rows)), ("spark", 0)):
        groups, clusters = duplicate_groups(_scored(spark, rows), dataclasses.replace(settings, driver_max_rows=limit))
        found[path] = (sorted((r.uid, r.group, tuple(r.kinds)) for r in groups.collect()),
                       sorted(tuple(r) for r in clusters.collect()))
    assert found["driver"] == found["spark"]
    assert {kind for _, _, kinds in found["spark"][0] for kind in kinds} == {"exact", "image", "caption"}
    assert found["spark"][1], "some caption clusters"


@pytest.mark.slow
def test_shapes_world_planted_duplicates_are_removed(shapes_world):
    truth, curated, rejects = shapes_world
    planted = truth[truth.kind.isin(["duplicate_image", "near_duplicate_image"]) & truth.duplicate_of.isin(truth.index)]
    removed = [uid in rejects.index or truth.duplicate_of[uid] in rejects.index for uid in planted.index]
    assert len(planted) >= 60
    assert np.mean(removed) >= 0.95, f"{np.mean(removed):.3f} of {len(planted)} planted duplicates removed"


def test_shapes_world_no_row_is_dropped_for_a_survivor_of_another_scene(shapes_world):
    truth, curated, rejects = shapes_world
    assert len(curated) + len(rejects) == len(truth)
    assert set(rejects.duplicate_of) <= set(curated.uid)
    wrong = [(uid, r.duplicate_of, r.reason) for uid, r in rejects.iterrows()
             if json.loads(truth.scene[uid]) != json.loads(truth.scene[r.duplicate_of])]
    assert wrong == []


# --- caption evidence is confirmed on the pixels: one caption under different pictures -------------------

def _stored(data: bytes, download) -> bytes:
    """Image bytes as the download stage stores them (its resizer and settings)."""
    from capfilt.net.fetch import stored_form
    image, *_, error = stored_form(download)(io.BytesIO(data))
    assert image is not None, error
    return image


def _skimage_picture(name: str) -> Image.Image:
    """A real photo or drawing from scikit-image's package files (no download)."""
    from importlib import resources
    return Image.open(io.BytesIO((resources.files("skimage") / "data" / name).read_bytes())).convert("RGB")


def _at_cosine(base, cosine: float, count: int, seed: int):
    """`count` unit vectors at `cosine` from one another (each sqrt(cosine) from base)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.column_stack([base, rng.normal(size=(len(base), count))]))
    return [np.sqrt(cosine) * base + np.sqrt(1 - cosine) * basis[:, k + 1] for k in range(count)]


REAL_PICTURES = {"image": ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png"),
                 "A flower.": ("horse.png", "logo.png", "moon.png", "retina.jpg")}


@pytest.fixture(scope="module")
def real_pictures():
    """scikit-image's real pictures stored as the default download stores them, a generic caption per
    set, and embeddings where the embedding check alone merges them (cosine 0.92 to one another, as
    a CLIP can place two pictures of one subject: >= caption_image_threshold 0.9, < image_threshold
    0.95, so only caption evidence can link them). One more row: chelsea re-encoded at JPEG 60 and resized to
    half, under the same caption, at cosine 0.93 to chelsea."""
    download = load_config(None, []).download
    rows, base = [], _unit(50)
    for caption, names in REAL_PICTURES.items():
        for name, embedding in zip(names, _at_cosine(base, 0.92, len(names), seed=len(caption))):
            rows.append(_row(name.split(".")[0], _stored(encoded(_skimage_picture(name), quality=95), download), caption,
                             embedding, 0.5, size=(256, 256)))
    chelsea = next(r for r in rows if r["uid"] == "chelsea")
    picture = _skimage_picture("chelsea.png")
    copy = _stored(encoded(picture.resize((picture.width // 2, picture.height // 2), Image.Resampling.BICUBIC), quality=60),
                   download)
    embedding = _toward(np.frombuffer(chelsea["image_embedding"], "<f2").astype(float), _unit(51), 0.93)
    rows.append(_row("chelsea_copy", copy, "image", embedding / np.linalg.norm(embedding), 0.49, size=(256, 256)))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("path", ["driver", "spark"])
def test_different_real_pictures_under_one_generic_caption_are_kept_and_a_copy_of_one_goes(spark, real_pictures, path):
    import dataclasses
    settings = DedupSettings() if path == "driver" else DedupSettings(driver_max_rows=0)
    curated, rejects = dedup(_scored(spark, real_pictures), settings, seed=0)
    kept = sorted(r.uid for r in curated.collect())
    dropped = {r.uid: (r.reason, r.duplicate_of) for r in rejects.collect()}
    assert dropped == {"chelsea_copy": ("near_duplicate_caption", "chelsea")}
    assert kept == sorted(r["uid"] for r in real_pictures if r["uid"] != "chelsea_copy")
    # Without the thumbnails, the same rows are merged on caption evidence: the check is what keeps them.
    _, unconfirmed = dedup(_scored(spark, real_pictures), dataclasses.replace(settings, image_verify="none"), seed=0)
    assert {r.reason for r in unconfirmed.collect()} == {"near_duplicate_caption"}
    assert unconfirmed.count() == len(real_pictures) - len(REAL_PICTURES)


def _twins():
    """(scene, the same scene with one object's shape changed): layouts drawn with one seed, so the
    pictures differ only where that object is."""
    from capfilt.world.scene import SceneObject
    one = [("white", "yellow", "small", "circle", "cross"), ("white", "yellow", "small", "triangle", "cross"),
           ("black", "red", "small", "circle", "triangle"), ("black", "red", "small", "square", "cross")]
    pairs = [(Scene((SceneObject(c, a, s),), bg), Scene((SceneObject(c, b, s),), bg)) for bg, c, s, a, b in one]
    left = SceneObject("blue", "square", "small")
    for a, b in (("circle", "square"), ("cross", "triangle")):
        pairs.append((Scene((left, SceneObject("green", a, "small")), "gray"),
                      Scene((left, SceneObject("green", b, "small")), "gray")))
    return pairs


@pytest.mark.slow
def test_shapes_world_scenes_differing_in_one_shape_under_one_caption_are_not_merged(spark):
    """The shapes CLIP barely sees shape: it puts these twins at cosine >= caption_image_threshold, and
    they share a caption; the thumbnails tell them apart. A re-encoded, resized copy of one still goes."""
    import dataclasses

    import torch

    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.udfs.models import SHAPES_CLIP, load_clip
    torch.set_num_threads(1)
    cfg = shapes_world_settings(load_config(None, []))
    clip = load_clip(SHAPES_CLIP, "cpu")
    blobs, uids, captions = [], [], []
    for k, (scene, twin) in enumerate(_twins()):
        caption = f"stock photo of shapes number {k}"
        for name, shown in (("a", scene), ("b", twin)):
            blobs.append(_stored(encode_jpeg(render(shown, 64, np.random.default_rng(k)), 90), cfg.download))
            uids.append(f"twin{k}{name}")
            captions.append(caption)
    original = render(_twins()[0][0], 64, np.random.default_rng(0))
    blobs.append(_stored(encode_jpeg(original.resize((80, 80), Image.Resampling.BICUBIC), 60), cfg.download))
    uids.append("twin0a_copy")
    captions.append(captions[0])
    embeddings = clip.encode_images([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    twins = [float(embeddings[2 * k] @ embeddings[2 * k + 1]) for k in range(len(_twins()))]
    assert min(twins) >= cfg.dedup.caption_image_threshold, twins  # the embedding alone would merge them
    rows = [_row(uid, blob, caption, emb, 0.5 - i / 1000)
            for i, (uid, blob, caption, emb) in enumerate(zip(uids, blobs, captions, embeddings))]
    curated, rejects = dedup(_scored(spark, rows), cfg.dedup, seed=0)
    dropped = {r.uid: r.duplicate_of for r in rejects.collect()}
    assert dropped == {"twin0a_copy": "twin0a"}
    assert curated.count() == len(rows) - 1
    _, unconfirmed = dedup(_scored(spark, rows), dataclasses.replace(cfg.dedup, image_verify="none"), seed=0)
    merged = {r.uid: r.duplicate_of for r in unconfirmed.collect()}
    assert all(merged.get(f"twin{k}b") == f"twin{k}a" for k in range(len(_twins()))), merged  # without the check
