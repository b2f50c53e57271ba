"""The filter stage on Spark: scores equal a direct open_clip computation, the selection rules keep
what their papers keep, and rows without an aligned caption go to rejects with their best score."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.pipelines.config import FilterSettings
from capfilt.pipelines.filter import score, select, split_scored
from capfilt.pipelines.inference import PASS
from capfilt.schemas import CAPTIONED, REJECTS, SCORED
from helpers import encoded, solid


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-init open_clip CLIP saved as a local checkpoint folder (the loader's local path)."""
    import open_clip
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny-clip")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                           "head_width": 32},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    save_file(open_clip.CLIP(**cfg).state_dict(), str(folder / "open_clip_model.safetensors"))
    return str(folder)


def _captioned(spark, rows):
    full = [(uid, f"http://h/{uid}", caption, image, 64, 64, 64, 64, "0" * 64, synthetic)
            for uid, caption, image, synthetic in rows]
    return spark.createDataFrame(full, CAPTIONED.spark_schema())


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory):
    """A random-init ViT-B-32 (the filter's default architecture) saved as a local checkpoint."""
    import open_clip
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("vit-b-32")
    torch.manual_seed(0)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32")}))
    save_file(open_clip.create_model("ViT-B-32").state_dict(), str(folder / "open_clip_model.safetensors"))
    return str(folder)


def _direct(which: str, ref: str):
    """(model, preprocess, tokenizer) straight from open_clip; the shapes CLIP's compact token table
    belongs to the model, so its tokenizer is the loader's."""
    import open_clip
    if which == "shapes":
        from capfilt.udfs.models import load_clip
        loaded = load_clip(ref, "cpu")
        return loaded.model, loaded.preprocess, loaded.tokenizer
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + ref)
    return model.eval(), preprocess, open_clip.get_tokenizer("local-dir:" + ref)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "shapes", "vit-b-32"])
def test_spark_scores_equal_a_direct_open_clip_computation(spark, which, request):
    from capfilt.udfs.models import SHAPES_CLIP
    ref = {"tiny": lambda: request.getfixturevalue("tiny_clip"), "shapes": lambda: SHAPES_CLIP,
           "vit-b-32": lambda: request.getfixturevalue("vit_b_32")}[which]()
    rows = [(f"u{i}", cap, solid(col), syn) for i, (cap, col, syn) in enumerate([
        ("a red square", (220, 20, 20), ["a red square", "a green thing"]),
        ("   ", (20, 220, 20), ["green"]),                      # blank web caption: no web candidate
        ("x" * 10_000, (20, 20, 220), []),                      # 10,000 characters: truncated, scored
        ("blue", (20, 20, 200), ["a blue square on white", "blue", "a red circle"]),
    ])]
    settings = FilterSettings(model=ref, rule="threshold", threshold=-1.0, device="cpu")
    got = {r.uid: r for r in score(_captioned(spark, rows), settings).select("uid", PASS).collect()}

    model, preprocess, tokenizer = _direct(which, ref)
    with torch.no_grad():
        for uid, caption, image, synthetic in rows:
            img = model.encode_image(preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None], normalize=True)[0]
            texts = ([caption] if caption.strip() else []) + synthetic
            txt = model.encode_text(tokenizer(texts), normalize=True)
            expected = (txt @ img).numpy()
            scores = got[uid][PASS]["scores"]
            present = [s for s in scores if s is not None]
            assert (scores[0] is None) == (not caption.strip())
            np.testing.assert_allclose(present, expected, atol=1e-5)
            emb = np.frombuffer(got[uid][PASS]["embedding"], "<f2")
            np.testing.assert_allclose(emb, img.numpy(), atol=2e-3)  # float16
    assert len({round(float(v), 4) for r in got.values() for v in r[PASS]["scores"] if v is not None}) > 3


def _scored(spark, rows):
    """A DataFrame as `score` returns it, with hand-set scores: (uid, web caption, synthetic, scores)."""
    from pyspark.sql import functions as F
    df = _captioned(spark, [(u, c, b"", s) for u, c, s, _ in rows])
    scores = spark.createDataFrame([(u, sc) for u, _, _, sc in rows], "uid string, scores array<float>")
    return df.join(scores, "uid").withColumn(PASS, F.struct(F.lit(b"\x00\x3c").alias("embedding"),
                                                            F.col("scores"), F.lit(None).cast("string").alias("error"))
                                             ).drop("scores")


ROWS = [("a", "web a", ["s1", "s2", "s3"], [0.30, 0.10, 0.35, 0.29]),
        ("b", "web b", ["s1", "s2"], [0.10, 0.20, 0.05]),
        ("c", None, ["s1"], [None, 0.31])]


def _kept(spark, settings, cutoff=None):
    selected = select(_scored(spark, ROWS), settings, cutoff)
    scored, rejects = split_scored(selected)
    SCORED.validate(scored)
    REJECTS.validate(rejects)
    kept = {r.uid: [c.text for c in r.candidates if c.kept] for r in scored.collect()}
    primary = {r.uid: r.caption_primary for r in scored.collect()}
    return kept, primary, {r.uid: (r.reason, r.detail) for r in rejects.collect()}


@pytest.mark.slow
def test_threshold_rule_keeps_captions_over_the_threshold(spark):
    kept, primary, rejected = _kept(spark, FilterSettings(rule="threshold", threshold=0.28))
    assert kept == {"a": ["web a", "s2", "s3"], "c": ["s1"]}
    assert primary == {"a": "s2", "c": "s1"}, "the best kept caption"
    assert rejected == {"b": ("no_aligned_caption", "best score 0.2000")}


@pytest.mark.slow
def test_topk_rule_ranks_web_and_synthetic_together(spark):
    kept, _, rejected = _kept(spark, FilterSettings(rule="topk", top_k=2, threshold=0.0))
    assert kept == {"a": ["web a", "s2"], "b": ["web b", "s1"], "c": ["s1"]} and rejected == {}


@pytest.mark.slow
def test_percentile_rule_uses_the_cutoff_computed_on_the_cluster(spark):
    from capfilt.pipelines.filter import percentile_cutoff
    cutoff = percentile_cutoff(_scored(spark, ROWS), 0.5)
    assert cutoff == pytest.approx(0.10, abs=1e-6)  # web scores 0.30, 0.10: the median is the lower one
    kept, _, _ = _kept(spark, FilterSettings(rule="percentile"), cutoff)
    assert kept == {"a": ["web a", "s1", "s2", "s3"], "b": ["web b", "s1"], "c": ["s1"]}
    with pytest.raises(ValueError, match="needs the cutoff"):
        select(_scored(spark, ROWS), FilterSettings(rule="percentile"), None)


@pytest.mark.slow
def test_bad_images_become_named_rejects_not_crashes(spark, tiny_clip):
    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(buf, "JPEG")
    rows = [("ok", "red", solid((200, 0, 0)), ["red"]), ("empty", "red", b"", ["red"]),
            ("cut", "red", solid((200, 0, 0))[:100], ["red"]), ("cmyk", "red", buf.getvalue(), ["red"])]
    settings = FilterSettings(model=tiny_clip, rule="threshold", threshold=-1.0, device="cpu")
    scored, rejects = split_scored(select(score(_captioned(spark, rows), settings), settings))
    assert sorted(r.uid for r in scored.collect()) == ["cmyk", "ok"]
    assert {r.uid: r.reason for r in rejects.collect()} == {"empty": "undecodable_image", "cut": "undecodable_image"}


# --- the ITM scorer (filter.scorer itm | two_step) -------------------------------------------------

def _direct_itm(ref: str, image: bytes, texts: list[str]) -> np.ndarray:
    """Match probabilities straight from transformers: BlipForImageTextRetrieval(use_itm_head=True)."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor
    model = BlipForImageTextRetrieval.from_pretrained(ref, torch_dtype=torch.float32).eval()
    processor = BlipProcessor.from_pretrained(ref)
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    inputs = processor(images=[pil] * len(texts), text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, use_itm_head=True).itm_score
    return torch.softmax(logits, dim=-1)[:, 1].numpy()


@pytest.mark.parametrize("scorer", ["itm", "two_step", "two_step_top"])
@pytest.mark.slow
def test_spark_itm_scores_equal_a_direct_blip_itm_call(spark, scorer):
    """two_step_top: the ITM sees only each row's best CLIP candidate (filter.clip_top=1), floor or not."""
    from capfilt.udfs.models import SHAPES_CLIP, SHAPES_ITM
    from capfilt.world.scene import Scene, SceneObject, render
    scenes = [Scene((SceneObject("red", "square", "large"),), "white"),
              Scene((SceneObject("blue", "circle", "small"), SceneObject("green", "cross", "large")), "black")]
    images = [encoded(render(s, 64, np.random.default_rng(i)), quality=95) for i, s in enumerate(scenes)]
    rows = [("u0", "a large red square on a white background", images[0],
             ["a large red circle on a white background", "a large red square, white background", "image"]),
            ("u1", "   ", images[1], ["a small blue circle left of a large green cross on a black background",
                                      "Stock photo of a tiny navy ball and a big emerald plus | hd wallpaper"]),
            ("u2", "x" * 10_000, images[0], [])]
    clip_only = {r.uid: r[PASS] for r in score(_captioned(spark, rows), FilterSettings(
        model=SHAPES_CLIP, device="cpu")).select("uid", PASS).collect()}
    floor = float(np.median([v for r in clip_only.values() for v in r["scores"] if v is not None]))
    top = 1 if scorer == "two_step_top" else 0
    floor = -1.0 if top else floor
    settings = FilterSettings(model=SHAPES_CLIP, device="cpu", scorer=scorer.removesuffix("_top"),
                              itm_model=SHAPES_ITM, clip_floor=floor, clip_top=top)
    got = {r.uid: r[PASS] for r in score(_captioned(spark, rows), settings).select("uid", PASS).collect()}
    rescored = skipped = 0
    for uid, caption, image, synthetic in rows:
        assert got[uid]["scores"] == clip_only[uid]["scores"], "the CLIP step is the same in every scorer"
        texts = [caption if caption.strip() else None] + synthetic
        expected = _direct_itm(SHAPES_ITM, image, [t if t is not None else "" for t in texts])
        best = max((j for j, t in enumerate(texts) if t is not None), key=lambda j: got[uid]["scores"][j])
        for j, (text, clip_score, itm_score, want) in enumerate(zip(texts, got[uid]["scores"], got[uid]["itm_scores"],
                                                                    expected)):
            if text is None or scorer == "two_step" and clip_score < floor or top and j != best:
                assert itm_score is None
                skipped += text is not None
            else:
                assert itm_score == pytest.approx(float(want), abs=1e-5)
                rescored += 1
    assert rescored == (3 if top else rescored) >= 3 and (skipped >= 2 if scorer.startswith("two_step") else skipped == 0)
    assert all(r["seconds"]["itm"] is not None for r in got.values())


def _itm_scored(spark, rows):
    """A DataFrame as `score` returns it with the ITM on: (uid, web caption, synthetic, clip, itm)."""
    from pyspark.sql import functions as F
    df = _captioned(spark, [(u, c, b"", s) for u, c, s, _, _ in rows])
    scores = spark.createDataFrame([(u, cs, its) for u, _, _, cs, its in rows],
                                   "uid string, scores array<float>, itm_scores array<float>")
    return df.join(scores, "uid").withColumn(PASS, F.struct(
        F.lit(b"\x00\x3c").alias("embedding"), "scores", "itm_scores", F.lit(None).cast("string").alias("error"))
    ).drop("scores", "itm_scores")


# clip scores would keep "web a" and "s1" at 0.28; the ITM disagrees
ITM_ROWS = [("a", "web a", ["s1", "s2"], [0.30, 0.35, 0.10], [0.20, 0.90, 0.60]),
            ("b", "web b", ["s1"], [0.40, 0.50], [0.10, 0.30]),
            ("c", None, ["s1"], [None, 0.31], [None, None])]  # two_step: s1 under the CLIP floor


@pytest.mark.slow
@pytest.mark.parametrize("rule, expected", [
    ("threshold", {"a": ["s1", "s2"]}),
    ("topk", {"a": ["s1"]}),
])
def test_selection_rules_work_on_the_itm_score_and_keep_both_scores(spark, rule, expected):
    settings = FilterSettings(rule=rule, top_k=1, threshold=0.28, scorer="two_step", itm_threshold=0.5)
    selected = select(_itm_scored(spark, ITM_ROWS), settings)
    scored, rejects = split_scored(selected, settings.scorer)
    SCORED.validate(scored)
    rows = {r.uid: r for r in scored.collect()}
    assert {u: [c.text for c in r.candidates if c.kept] for u, r in rows.items()} == expected
    a = {c.text: c for c in rows["a"].candidates}
    assert (a["s1"].score, a["s1"].clip_score, a["s1"].itm_score) == pytest.approx((0.90, 0.35, 0.90))
    assert rows["a"].best_score == pytest.approx(0.90) and rows["a"].caption_primary == "s1"
    assert {r.uid: r.detail for r in rejects.collect()} == {
        "b": "best score 0.3000 (ITM), best CLIP score 0.5000", "c": "best score NaN (ITM), best CLIP score 0.3100"}


def test_percentile_rule_on_the_itm_score_uses_the_itm_web_scores(spark):
    from capfilt.pipelines.filter import percentile_cutoff
    assert percentile_cutoff(_itm_scored(spark, ITM_ROWS), 0.5, "itm_scores") == pytest.approx(0.10, abs=1e-6)


def test_the_itm_reference_is_checked_before_any_work(tmp_path):
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_ITM, ModelNotAvailable, check_reference
    check_reference(SHAPES_ITM, "itm")
    with pytest.raises(ValueError, match="BlipForConditionalGeneration model, not a BLIP BlipForImageTextRetrieval"):
        check_reference(SHAPES_CAPTIONER, "itm")
    with pytest.raises(ValueError, match="has no config.json"):
        check_reference(SHAPES_CLIP, "itm")
    with pytest.raises(ValueError, match="not an open_clip reference"):
        check_reference("ViT-B-32:laion2b_s34b_b79k", "itm")
    with pytest.raises(ModelNotAvailable):
        check_reference(str(tmp_path / "no-such-itm"), "itm")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(
        {"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]}))
    with pytest.raises(ModelNotAvailable, match="no weights"):
        check_reference(str(tmp_path / "empty"), "itm")
