"""Scenes, rendering and captions of the shapes world."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capfilt.world.captions import N_PHRASINGS, SYNONYMS, VOCABULARY, describe, parse, web_phrasing
from capfilt.world.scene import (
    COLOUR_RGB, SHAPES, Scene, SceneObject, attribute_differences, change_one_attribute, encode_jpeg, render,
    sample_scene,
)

REPO = Path(__file__).resolve().parents[1]


def scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def colour_mask(image, colour: str) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    return np.abs(pixels - np.array(COLOUR_RGB[colour])).sum(axis=2) < 60


def test_scene_json_round_trips_and_is_canonical():
    for scene in scenes(0, 500):
        assert Scene.from_dict(scene.to_dict()) == scene
        assert Scene.from_json(scene.to_json()) == scene
    a = Scene((SceneObject("red", "circle", "small"),), "white")
    b = Scene([SceneObject("red", "circle", "small")], "white")  # a list is accepted and frozen
    assert a == b and hash(a) == hash(b) and a.to_json() == b.to_json()


@pytest.mark.parametrize("make", [
    lambda: SceneObject("pink", "circle", "small"),
    lambda: SceneObject("red", "hexagon", "small"),
    lambda: SceneObject("red", "circle", "medium"),
    lambda: Scene((), "white"),
    lambda: Scene((SceneObject("red", "circle", "small"),) * 3, "white"),
    lambda: Scene((SceneObject("red", "circle", "small"),), "beige"),
])
def test_invalid_scenes_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_sampled_scenes_cover_the_world_and_two_objects_differ():
    sample = scenes(1, 2000)
    assert all(s.objects[0] != s.objects[1] for s in sample if len(s.objects) == 2)
    assert {len(s.objects) for s in sample} == {1, 2}
    assert {o.shape for s in sample for o in s.objects} == set(SHAPES)


def test_attribute_differences_counts_single_changes():
    red, blue = SceneObject("red", "circle", "small"), SceneObject("blue", "square", "large")
    scene = Scene((red, blue), "white")
    assert attribute_differences(scene, scene) == 0
    assert attribute_differences(scene, Scene((blue, red), "white")) == 1
    assert attribute_differences(scene, Scene((blue, red), "black")) == 2
    assert attribute_differences(scene, Scene((SceneObject("red", "circle", "large"), blue), "gray")) == 2
    assert attribute_differences(scene, Scene((red,), "white")) > 6


def test_change_one_attribute_changes_exactly_one():
    rng = np.random.default_rng(2)
    changed_fields = set()
    for scene in scenes(2, 2000):
        other = change_one_attribute(scene, rng)
        assert other != scene and attribute_differences(scene, other) == 1
        if other.background != scene.background:
            changed_fields.add("background")
        elif other.objects == scene.objects[::-1]:
            changed_fields.add("order")
    assert changed_fields == {"background", "order"}


def test_same_seed_gives_byte_identical_images_and_another_seed_does_not():
    def encoded(seed: int) -> list[bytes]:
        rng = np.random.default_rng(seed)
        return [encode_jpeg(render(sample_scene(rng), 64, rng)) for _ in range(50)]

    assert encoded(3) == encoded(3)
    assert encoded(3) != encoded(4)


def test_render_keeps_left_object_left_and_right_object_right():
    rng = np.random.default_rng(5)
    checked = 0
    for scene in scenes(5, 400):
        if len(scene.objects) != 2 or scene.objects[0].colour == scene.objects[1].colour:
            continue
        image = render(scene, 64, rng)
        assert image.mode == "RGB" and image.size == (64, 64)
        left, right = (colour_mask(image, o.colour) for o in scene.objects)
        assert left[:, 32:].sum() == 0 and right[:, :32].sum() == 0
        assert left.sum() > 0 and right.sum() > 0
        checked += 1
    assert checked > 100


def test_small_and_large_never_overlap_in_area_for_any_shape():
    rng = np.random.default_rng(6)
    for shape in SHAPES:
        areas = {"small": [], "large": []}
        for _ in range(40):
            for size in areas:
                scene = Scene((SceneObject("red", shape, size),), "white")
                areas[size].append(colour_mask(render(scene, 64, rng), "red").sum())
        assert 2 * max(areas["small"]) < min(areas["large"]), shape


def test_shapes_render_distinctly():
    masks = {s: colour_mask(render(Scene((SceneObject("blue", s, "large"),), "white")), "blue") for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                differing = (masks[a] ^ masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert differing > 0.15, (a, b)


def test_render_scales_to_other_sizes():
    scene = Scene((SceneObject("red", "circle", "large"), SceneObject("blue", "square", "small")), "gray")
    image = render(scene, 128)
    assert image.size == (128, 128)
    assert colour_mask(image, "red")[:, 64:].sum() == 0


def test_benchmark_reports_render_encode_rate_above_floor():
    # The target is >= 2,000/s; the floor is lenient so that a busy machine does not flake.
    out = subprocess.run([sys.executable, str(REPO / "bench" / "world_speed.py"), "--n", "1500"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    rate = float(re.search(r"render\+encode: (\d+) images/s", out).group(1))
    assert rate >= 500, out


def test_every_phrasing_parses_back_to_its_scene():
    rng = np.random.default_rng(7)
    sample = scenes(7, 5000)
    for scene in sample:
        for phrasing in range(N_PHRASINGS):
            text = describe(scene, phrasing)
            assert parse(text) == scene, text
        text = web_phrasing(scene, rng)
        assert parse(text) == scene, text


def test_clean_phrasings_use_only_the_compact_vocabulary():
    assert 25 <= len(VOCABULARY) <= 40
    used = set()
    for scene in scenes(8, 300):
        for phrasing in range(N_PHRASINGS):
            used |= set(re.findall(r"[a-z]+", describe(scene, phrasing)))
    assert used == set(VOCABULARY)


def test_web_phrasings_are_never_clean_and_bring_words_outside_the_vocabulary():
    rng = np.random.default_rng(9)
    synonyms = {s for options in SYNONYMS.values() for s in options}
    assert not synonyms & set(VOCABULARY)
    seen_outside = set()
    for scene in scenes(9, 500):
        text = web_phrasing(scene, rng)
        assert text not in {describe(scene, p) for p in range(N_PHRASINGS)}
        seen_outside |= set(re.findall(r"[a-z]+", text.lower())) - set(VOCABULARY)
    assert {"crimson", "ball", "box", "grey"} <= seen_outside


def test_both_orders_of_a_scene_are_told_apart():
    red, blue = SceneObject("red", "circle", "small"), SceneObject("blue", "square", "large")
    scene = Scene((red, blue), "white")
    assert parse("a small red circle left of a large blue square on a white background") == scene
    assert parse("a large blue square to the right of a small red circle, white background") == scene
    swapped = Scene((blue, red), "white")
    assert parse("a large blue square left of a small red circle on a white background") == swapped
    web = "Stock photo of a tiny crimson ball left of a big navy box on a snowy background | HD wallpaper"
    assert parse(web) == scene


@pytest.mark.parametrize("text", [
    "", "image", "IMG_2041.JPG", "untitled", "buy cheap watches online",
    "a small red circle",  # no background
    "a small red circle on a pink background",
    "a small red circle on a white background and more",
    "a small red circle left of on a white background",
    "a small red circle on a white background " * 200,
])
def test_text_that_describes_no_scene_parses_to_none(text):
    assert parse(text) is None


def test_a_watermark_is_deterministic_translucent_and_fits_any_size():
    from capfilt.world.scene import WATERMARK_OPACITY, WATERMARK_STYLES, draw_watermark, sample_watermark
    rng = np.random.default_rng(12)
    marks = [sample_watermark(rng) for _ in range(60)]
    assert marks[:5] == [sample_watermark(r) for r in [np.random.default_rng(12)] for _ in range(5)]
    assert {m.style for m in marks} == set(WATERMARK_STYLES) and {m.tone for m in marks} == {"light", "dark"}
    assert all(WATERMARK_OPACITY[0] <= m.opacity <= WATERMARK_OPACITY[1] for m in marks)
    scene = Scene((SceneObject("red", "circle", "large"),), "gray")
    for mark in marks[:12]:
        for size in ((64, 64), (512, 512), (80, 52)):
            image = render(scene, max(size)).crop((0, 0, *size))
            marked = draw_watermark(image, mark)
            assert marked.size == image.size and marked.mode == "RGB"
            change = np.abs(np.asarray(marked, float) - np.asarray(image, float))
            assert change.max() <= 255 * mark.opacity + 1  # translucent: never the mark's full colour
            assert (change.max(axis=2) > 8).mean() > 0.01, (mark, size)  # and visible
        assert encode_jpeg(draw_watermark(image, mark)) == encode_jpeg(draw_watermark(image, mark))
