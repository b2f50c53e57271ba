"""The model loader (udfs/models/) and the committed shapes-world checkpoints (models/).

Quality tests load the committed checkpoints through the loader and measure them on held-out
images, so they fail when a model, its preprocessing or its tokenizer breaks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capfilt.lab.data import EVAL_SEED_BASE, annotated, wrong_attribute_captions
from capfilt.udfs import models
from capfilt.udfs.models import (
    BLIP_CAPTIONER, DEFAULT_CAPTIONER, DEFAULT_CLIP, SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_CLIP_WEB, ModelNotAvailable,
    UnsafeCheckpoint, cached_captioner, cached_clip, load_captioner, load_clip, parse_reference,
)
from capfilt.world.captions import parse

TEST_SEED = EVAL_SEED_BASE + 1  # held out from training (seeds < EVAL_SEED_BASE) and from the benchmark seed


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def held_out():
    return annotated(200, TEST_SEED)


@pytest.fixture(scope="module")
def clip():
    return cached_clip(SHAPES_CLIP)


@pytest.fixture(scope="module")
def captioner():
    return cached_captioner(SHAPES_CAPTIONER)


# --- quality of the committed models, through the loader -----------------------------------------

def test_true_caption_outranks_a_mismatched_one(clip, held_out):
    rng = np.random.default_rng(0)
    n = len(held_out)
    true = [caps[i % len(caps)] for i, caps in enumerate(held_out.captions)]
    others = []
    for i in range(n):  # another image's caption, of a different scene
        j = int(rng.integers(n))
        while held_out.scenes[j] == held_out.scenes[i]:
            j = int(rng.integers(n))
        others.append(held_out.captions[j][int(rng.integers(len(held_out.captions[j])))])
    wrong = wrong_attribute_captions(held_out.scenes, rng)
    images = clip.encode_images([held_out.pil(i) for i in range(n)])
    score = {k: (images * clip.encode_texts(v)).sum(axis=1) for k, v in
             (("true", true), ("other", others), ("wrong", wrong))}
    assert (score["true"] > score["other"]).mean() >= 0.95
    assert (score["true"] > score["wrong"]).mean() >= 0.85


def test_sampled_captions_parse_to_the_right_scene(captioner, held_out):
    """Issue 4's bar: >= 0.80 of sampled captions (top_p 0.9) parse to exactly the right scene."""
    captions = captioner.generate([held_out.pil(i) for i in range(len(held_out))], top_p=0.9,
                                  seeds=range(len(held_out)))
    parsed = [parse(caps[0]) for caps in captions]
    assert np.mean([p is not None for p in parsed]) >= 0.95, "fluent: captions in the world's language"
    exact = np.mean([p == scene for p, scene in zip(parsed, held_out.scenes)])
    assert exact >= 0.80


def test_sampling_is_seeded_per_image_not_per_batch(captioner, held_out):
    images = [held_out.pil(i) for i in range(4)]
    together = captioner.generate(images, num_captions=3, seeds=[11, 12, 13, 14])
    apart = captioner.generate([images[2], images[0]], num_captions=3, seeds=[13, 11], batch_size=1)
    assert apart == [together[2], together[0]]
    again = captioner.generate(images, num_captions=3, seeds=[11, 12, 13, 14])
    assert again == together
    # five phrasings are about equally likely: 12 draws that all agree would mean no sampling
    assert len({c for caps in together for c in caps}) > 4


def test_min_length_holds_back_the_end_token_and_repetition_penalty_demotes_seen_tokens():
    from capfilt.udfs.models import _NucleusSampler
    end = 0
    logits = torch.tensor([[9.0, 5.0, 4.9, -1.0]] * 2)
    start = torch.tensor([[3], [3]])
    greedy = dict(top_p=0.01, temperature=1.0, end=end)  # top_p this small keeps only the best token
    streams = lambda: [np.random.default_rng(i) for i in range(2)]  # noqa: E731
    assert _NucleusSampler(streams(), **greedy)(logits, generated=start).tolist() == [end, end]
    held = _NucleusSampler(streams(), **greedy, min_new_tokens=2)
    assert held(logits, generated=start).tolist() == [1, 1]
    assert held(logits, generated=torch.tensor([[3, 1, 2]] * 2)).tolist() == [end, end]  # two out: may end
    seen = torch.tensor([[3, 1], [3, 2]])
    penalised = _NucleusSampler(streams(), **greedy, min_new_tokens=5, repetition_penalty=2.0)
    assert penalised(logits, generated=seen).tolist() == [2, 1]  # 5.0 -> 2.5 loses to 4.9, and back
    with pytest.raises(ValueError, match="min_new_tokens"):
        models.Captioner.generate(None, [], min_new_tokens=5, max_new_tokens=4)


@pytest.mark.parametrize("scale, top_p", [(1.0, 0.9), (8.0, 0.9), (16.0, 0.5), (8.0, 1.0)])
def test_the_sampler_picks_what_a_sort_of_the_whole_vocabulary_picks(scale, top_p):
    from capfilt.udfs.models.captioner import _TOP_K, _nucleus_pick
    torch.manual_seed(int(scale))
    logits = torch.randn(64, 49408) * scale  # scale 1: flat, the nucleus is most of the vocabulary
    logits[::7] = logits[:1]  # ties across rows
    sampler = models._NucleusSampler([np.random.default_rng(i) for i in range(64)], top_p, 1.0)
    draws = torch.tensor([np.random.default_rng(i).random() for i in range(64)], dtype=torch.float64)
    probs = torch.softmax(logits.double(), dim=-1)
    expected = _nucleus_pick(*probs.sort(dim=-1, descending=True), draws, top_p)
    assert torch.equal(sampler(logits), expected)
    nucleus = ((probs.sort(dim=-1, descending=True)[0].cumsum(dim=-1) < top_p).sum(dim=-1) + 1)
    assert (nucleus <= _TOP_K).any() == (scale > 1 and top_p < 1)  # both paths ran where expected


def test_captions_honour_min_length_and_stay_seeded_with_a_repetition_penalty(captioner, held_out):
    images = [held_out.pil(i) for i in range(6)]
    tokens = lambda caps: [len(captioner.tokenizer.tokenize(c)) for cs in caps for c in cs]  # noqa: E731
    short = captioner.generate(images, num_captions=2, seeds=range(6), max_new_tokens=4)
    assert max(tokens(short)) <= 4
    plain = captioner.generate(images, num_captions=2, seeds=range(6))
    longer = captioner.generate(images, num_captions=2, seeds=range(6), min_new_tokens=max(tokens(plain)) + 2)
    assert min(tokens(longer)) > max(tokens(plain)) >= 1
    penalised = captioner.generate(images, num_captions=2, seeds=range(6), repetition_penalty=5.0)
    assert penalised == captioner.generate(images, num_captions=2, seeds=range(6), repetition_penalty=5.0)
    assert penalised != plain


def test_blips_own_loop_samples_what_generate_samples_and_drops_ended_rows(captioner, held_out):
    from capfilt.udfs.models.blip import _blip_decode_cached, _blip_decode_generate, _texts
    from capfilt.udfs.models.captioner import _NucleusSampler
    pixels = captioner.preprocess([held_out.pil(i) for i in range(8)])
    end, pad = captioner.special["end"], captioner.special["pad"]
    asked = []

    def sampler():
        inner = _NucleusSampler([np.random.default_rng([i]) for i in range(24)], 0.9, 1.0, end=end)

        def sample(logits, rows=None, generated=None):
            asked.append(list(range(len(logits))) if rows is None else list(rows))
            return inner(logits, rows, generated)
        return sample

    def trimmed(rows):
        return [row[:row.index(end) + 1] for row in rows]  # every row ends well within 30 tokens

    generated = trimmed(_blip_decode_generate(captioner, pixels, 3, sampler(), 30))
    asked.clear()
    ours = _blip_decode_cached(captioner, pixels, 3, sampler(), 30)
    assert trimmed(ours) == generated
    ends = [len(row) - 2 for row in generated]  # the step that sampled each row's end token
    assert len(set(ends)) > 1
    assert asked == [[r for r in range(24) if ends[r] >= step] for step in range(max(ends) + 1)]
    assert _texts(captioner, ours) == [t.strip() for t in captioner.processor.batch_decode(
        torch.tensor([row + [pad] * (31 - len(row)) for row in generated]), skip_special_tokens=True)]


# --- the loader: local checkpoints round-trip -----------------------------------------------------

def _open_clip_folder(model, preprocess_cfg: dict, config: dict, folder: Path) -> Path:
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    state = {k: v.detach().half().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess_cfg}))
    return folder


@pytest.mark.slow
def test_loader_round_trips_a_random_vit_b_32_folder_and_file(tmp_path, held_out):
    import open_clip
    torch.manual_seed(0)
    original = open_clip.create_model("ViT-B-32").eval()
    original.half().float()  # what fp16 weights hold
    folder = _open_clip_folder(original, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                               open_clip.get_model_config("ViT-B-32"), tmp_path / "vit")
    loaded = load_clip(str(folder))
    assert loaded.device == "cpu" and loaded.precision == "fp32"
    assert tuple(loaded.preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)  # preprocess_cfg travelled
    image = held_out.pil(0)
    x = loaded.preprocess(image)[None]
    with torch.no_grad():
        expected_image = torch.nn.functional.normalize(original.encode_image(x), dim=-1).numpy()
        expected_text = torch.nn.functional.normalize(
            original.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a red circle"])), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images([image]), expected_image, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_texts(["a red circle"]), expected_text, atol=1e-5)
    # the same weights as NAME:file
    by_file = load_clip(f"ViT-B-32:{folder / 'open_clip_model.safetensors'}")
    np.testing.assert_allclose(by_file.encode_texts(["a red circle"]), expected_text, atol=1e-5)


def test_loader_round_trips_a_blip_config_saved_with_save_pretrained(tmp_path, held_out):
    from transformers import BlipForConditionalGeneration
    from capfilt.lab.tokens import save_blip_processor
    from capfilt.lab.train_captioner import MEAN, STD, blip_config
    folder = tmp_path / "blip"
    processor = save_blip_processor(folder, 64, MEAN, STD)
    torch.manual_seed(0)
    original = BlipForConditionalGeneration(blip_config(processor.tokenizer, width=32, vision_layers=1,
                                                        text_layers=1)).eval()
    original.save_pretrained(str(folder), safe_serialization=True)
    loaded = load_captioner(str(folder))
    assert loaded.family == "blip"
    pixels = loaded.preprocess([held_out.pil(0)])
    ids = processor.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(pixel_values=pixels, input_ids=ids).logits.numpy(),
                                   original(pixel_values=pixels, input_ids=ids).logits.numpy(), atol=1e-5)
    assert len(loaded.generate([held_out.pil(0)], num_captions=2, max_new_tokens=5)[0]) == 2


_TINY_COCA = {"embed_dim": 32,
              "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16,
                             "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 2,
                             "output_tokens": True},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                           "embed_cls": True, "output_tokens": True},
              "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                                 "attn_pooler_heads": 2}}


def test_loader_round_trips_a_coca_folder_and_samples_per_image(tmp_path, held_out):
    import open_clip
    config = {**_TINY_COCA, "custom_text": True}
    torch.manual_seed(0)
    original = open_clip.coca_model.CoCa(**_TINY_COCA).eval()
    torch.nn.init.normal_(original.text_decoder.text_projection, std=32 ** -0.5)  # open_clip leaves it empty
    folder = _open_clip_folder(original, {}, config, tmp_path / "coca")
    loaded = load_captioner(str(folder))
    assert loaded.family == "coca"
    images = [held_out.pil(i) for i in range(3)]
    together = loaded.generate(images, num_captions=2, seeds=[5, 6, 7], max_new_tokens=6)
    assert loaded.generate(images[1:2], num_captions=2, seeds=[6], max_new_tokens=6) == [together[1]]
    assert all(len(caps) == 2 and all(isinstance(c, str) for c in caps) for caps in together)


class _ScriptedSampler:
    """Delegates to a _NucleusSampler, then overrides: row r draws the pad id ("!", whose key the text
    tower hides from later queries) at step r % 3 and ends at step ends[r]. Keeps, per call, the rows
    asked for, their logits and their tokens so far."""

    def __init__(self, sampler, ends: dict, end: int, pad: int):
        self.sampler, self.ends, self.end, self.pad, self.calls = sampler, ends, end, pad, []

    def __call__(self, logits, rows, generated):
        self.calls.append((list(rows), logits.clone(), generated.clone()))
        tokens = self.sampler(logits, rows, generated)
        step = generated.shape[1] - 1
        for i, r in enumerate(rows):
            tokens[i] = self.end if self.ends.get(r) == step else self.pad if r % 3 == step else tokens[i]
        return tokens


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_the_cached_coca_loop_matches_the_full_prefix_model_and_drops_ended_rows(correct_cls_mask):
    import open_clip
    from capfilt.udfs.models.captioner import Captioner, _NucleusSampler
    from capfilt.udfs.models.coca import _coca_decode_cached
    torch.manual_seed(0)
    model = open_clip.coca_model.CoCa(**_TINY_COCA).eval()
    model.text.correct_cls_mask = correct_cls_mask
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
    eot, pad = tokenizer.eot_token_id, 0
    captioner = Captioner("tiny", "coca", model, None, tokenizer, "cpu", "fp32", lambda ids: "",
                          {"start": tokenizer.sot_token_id, "end": eot, "pad": pad})
    pixels = torch.randn(4, 3, 64, 64)
    ends = {0: 0, 1: 3, 5: 3, 7: 6, 8: 9}  # rows 2, 3, 4, 6, 9, 10, 11 run to the length limit
    sampler = _ScriptedSampler(_NucleusSampler([np.random.default_rng([i]) for i in range(12)], 0.9, 1.0),
                               ends, eot, pad)
    out = _coca_decode_cached(captioner, pixels, 3, sampler, 12)
    with torch.inference_mode():
        for pos, (rows, logits, generated) in enumerate(sampler.calls):
            assert rows == [r for r in range(12) if ends.get(r, pos) >= pos]  # an ended row is never asked again
            prefix = torch.tensor([out[r][:pos + 1] for r in rows])
            assert torch.equal(prefix, generated)
            full = model(pixels.repeat_interleave(3, dim=0)[rows], prefix, output_labels=False)["logits"][:, -1]
            np.testing.assert_allclose(logits.numpy(), full.numpy(), atol=1e-4)
    assert len(sampler.calls) == 12
    assert [row.index(eot) - 1 for row in out if eot in row] == list(ends.values())


def test_committed_checkpoints_are_fp16_small_and_carry_model_cards():
    from safetensors import safe_open
    total = sum(p.stat().st_size for p in models.MODELS_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024
    for folder, weights in ((SHAPES_CLIP, "open_clip_model.safetensors"), (SHAPES_CAPTIONER, "model.safetensors")):
        with safe_open(str(Path(folder) / weights), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "F32" not in dtypes and "F16" in dtypes
        card = json.loads((Path(folder) / "model_card.json").read_text())
        assert {"config", "training", "metrics"} <= set(card)
        assert card["training"]["seed"] is not None and card["training"]["train_seconds"] <= 20 * 60


# --- the loader: safety and failing fast -----------------------------------------------------------

class _Payload:
    """Unpickling this runs open(marker, 'w'): the marker file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("family", ["clip", "blip"])
def test_a_pickle_checkpoint_with_a_code_payload_is_refused_not_run(tmp_path, family):
    marker = tmp_path / "payload-ran"
    source = SHAPES_CLIP if family == "clip" else SHAPES_CAPTIONER
    folder = tmp_path / "evil"
    shutil.copytree(source, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    name = "open_clip_pytorch_model.bin" if family == "clip" else "pytorch_model.bin"
    torch.save({"state_dict": _Payload(marker)}, folder / name)
    load = load_clip if family == "clip" else load_captioner
    with pytest.raises(UnsafeCheckpoint, match="refused"):
        load(str(folder))
    assert not marker.exists()


def test_a_folder_without_weights_is_refused_not_randomly_initialised(tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(SHAPES_CLIP, folder)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelNotAvailable, match="no weights"):
        load_clip(str(folder))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL downloads cache under ~/.cache/clip
    parse_reference(DEFAULT_CLIP)  # imports open_clip: not part of what is timed


@pytest.mark.parametrize("ref,load", [(DEFAULT_CLIP, load_clip), (DEFAULT_CAPTIONER, load_captioner),
                                      (BLIP_CAPTIONER, load_captioner),
                                      ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", load_clip)])
def test_a_reference_not_cached_fails_fast_offline_naming_it_and_the_local_path_way(empty_hub_cache, monkeypatch,
                                                                                     ref, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable) as error:
        load(ref)
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert repr(ref) in message and "HF_HUB_OFFLINE" in message
    assert "pass the local path as the model reference" in message


def test_an_unreachable_hub_fails_fast_without_offline_mode(empty_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="cannot be reached"):
        load_captioner(BLIP_CAPTIONER)
    assert time.perf_counter() - start < 5.0


def test_a_missing_local_path_fails_fast(tmp_path):
    with pytest.raises(ModelNotAvailable, match="no such file or folder"):
        load_clip(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelNotAvailable, match="no weights file"):
        load_clip(f"ViT-B-32:{tmp_path / 'missing.safetensors'}")


@pytest.mark.parametrize("ref,kind,name,source", [
    ("ViT-B-32:laion2b_s34b_b79k", "open_clip_tag", "ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-B-32/laion2b_s34b_b79k", "open_clip_tag", "ViT-B-32", "laion2b_s34b_b79k"),
    ("coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k", "open_clip_tag", "coca_ViT-L-14",
     "mscoco_finetuned_laion2b_s13b_b90k"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hub", None, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("Salesforce/blip-image-captioning-large", "hub", None, "Salesforce/blip-image-captioning-large"),
])
def test_reference_spellings(ref, kind, name, source):
    parsed = parse_reference(ref)
    assert (parsed.kind, parsed.name, parsed.source) == (kind, name, source)


@pytest.mark.parametrize("ref", ["ViT-B-32", "ViT-B-32:no_such_tag", "not a reference", ""])
def test_references_that_name_no_weights_are_refused_with_a_reason(ref):
    with pytest.raises(ValueError):
        parse_reference(ref)


def test_local_folders_are_read_as_local_even_when_they_look_like_hub_ids(monkeypatch):
    monkeypatch.chdir(models.MODELS_DIR.parent)
    assert parse_reference("models/shapes-clip").kind == "local_dir"


# --- one registry of model families: the loaders and the driver's check both go through it ------------------

FAMILY_EXAMPLES = {"clip": SHAPES_CLIP, "coca": DEFAULT_CAPTIONER, "blip": SHAPES_CAPTIONER,
                   "blip_itm": models.SHAPES_ITM}
LOADERS = {"clip": load_clip, "captioner": load_captioner, "itm": models.load_itm}


def test_the_loaders_and_the_driver_check_dispatch_through_one_registry_of_families(tmp_path, monkeypatch):
    """Each family of the registry is what both check_reference and the role's loader pick for a reference
    of it, and a family added to the registry (a fake captioner recognised by its own config file) is
    picked by both, where before it was refused by both."""
    from dataclasses import replace

    from capfilt.udfs.models import families
    folder = tmp_path / "fake-captioner"
    folder.mkdir()
    (folder / "fake_config.json").write_text("{}")
    for refuse in (lambda: models.check_reference(str(folder), "captioner"), lambda: load_captioner(str(folder))):
        with pytest.raises(ValueError, match="has no open_clip_config.json or config.json"):
            refuse()
    seen = []

    def spied(family):  # the family, its check and its loader recording that they ran
        def check(ref, folder):
            seen.append(("check", family.name, ref.text))
            return []

        def load(ref, folder, device, precision):
            seen.append(("load", family.name, ref.text))
            return family.name
        return replace(family, check=check, load=load)

    fake = families.Family(name="fake", role="captioner", title="a fake captioner", config="fake_config.json",
                           weights=("fake.safetensors",), accepts=lambda ref: ref.kind == "local_dir",
                           check=None, load=None, download=None)
    registry = [spied(f) for f in [*families.FAMILIES, fake]]
    monkeypatch.setattr(families, "FAMILIES", registry)
    examples = {**FAMILY_EXAMPLES, "fake": str(folder)}
    assert [f.name for f in registry] == list(examples)  # a new family needs its example here
    for family in registry:
        ref = examples[family.name]
        models.check_reference(ref, family.role)
        assert LOADERS[family.role](ref, "cpu") == family.name
        assert seen[-2:] == [("check", family.name, ref), ("load", family.name, ref)]


# --- broken model folders: refused on the driver, one line naming the file ----------------------------

def _truncate(name: str, cut: int = 100):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:-cut])


def _write(name: str, text):
    return lambda folder: (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def _edit(name: str, **fields):
    def edit(folder):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config | fields))
    return edit


def _remove(*names):
    return lambda folder: [(folder / n).unlink() for n in names]


def _replace_weights(name: str, write):
    """The folder's safetensors removed; `write(path)` writes `name` instead."""
    def replace(folder):
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
        write(folder / name)
    return replace


SHAPES = {"clip": SHAPES_CLIP, "captioner": SHAPES_CAPTIONER, "itm": models.SHAPES_ITM}
BROKEN_MODELS = {
    # item 13 of issue 32: each of these passed the driver check or gave a traceback
    "itm_config_a_list": ("itm", _write("config.json", "[]"), "config.json must hold a JSON object, not a list"),
    "itm_config_not_json": ("itm", _write("config.json", "{nope"), "config.json is not valid JSON"),
    "itm_architectures_a_string": ("itm", _edit("config.json", architectures="BlipForImageTextRetrievalX"),
                                   "config.json: architectures must be a list of class names"),
    "itm_truncated_weights": ("itm", _truncate("model.safetensors"), "model.safetensors is truncated"),
    # the same file checks for every family the loader knows
    "clip_truncated_weights": ("clip", _truncate("open_clip_model.safetensors"), "open_clip_model.safetensors is truncated"),
    "clip_bytes_after_the_tensors": ("clip", lambda f: (f / "open_clip_model.safetensors").open("ab").write(b"x" * 8),
                                     "open_clip_model.safetensors is corrupt: 8 bytes follow its last tensor"),
    "clip_config_a_list": ("clip", _write("open_clip_config.json", "[]"), "open_clip_config.json must hold a JSON object"),
    "clip_config_without_model_cfg": ("clip", _write("open_clip_config.json", '{"model_cfg": 3}'),
                                      "open_clip_config.json needs a model_cfg object"),
    "clip_tokenizer_missing": ("clip", _remove("tokenizer.json", "tokenizer_config.json"), "the tokenizer"),
    "captioner_truncated_weights": ("captioner", _truncate("model.safetensors", 5000), "model.safetensors is truncated"),
    "captioner_weights_not_safetensors": ("captioner", _write("model.safetensors", b"garbage" * 20),
                                          "model.safetensors is not a safetensors file"),
    "captioner_config_a_list": ("captioner", _write("config.json", "[1]"), "config.json must hold a JSON object"),
    "captioner_vocab_missing": ("captioner", _remove("vocab.txt"), "the tokenizer and image processor"),
    "itm_preprocessor_missing": ("itm", _remove("preprocessor_config.json"), "the tokenizer and image processor"),
    "clip_pickle_of_a_bare_tensor": ("clip", _replace_weights("open_clip_pytorch_model.bin",
                                                              lambda p: torch.save(torch.zeros(3), p)),
                                     "open_clip_pytorch_model.bin holds a Tensor, not a state dict"),
    "captioner_pickle_a_corrupt_zip": ("captioner", _replace_weights("pytorch_model.bin",
                                                                     lambda p: p.write_bytes(b"PK\x03\x04" + bytes(64))),
                                       "pytorch_model.bin is not a readable PyTorch checkpoint"),
    "itm_weights_a_folder": ("itm", _replace_weights("model.safetensors", lambda p: p.mkdir()), "has config.json but no weights"),
    "itm_shard_missing": ("itm", _write("model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})), "model-00002-of-00002.safetensors does not exist"),
}


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_broken_model_folders_are_refused_on_the_driver_naming_the_file(tmp_path, case):
    role, corrupt, says = BROKEN_MODELS[case]
    folder = tmp_path / case
    shutil.copytree(SHAPES[role], folder)
    corrupt(folder)
    with pytest.raises((ValueError, ModelNotAvailable)) as error:
        models.check_reference(str(folder), role)
    message = str(error.value)
    assert message.startswith(f"model {str(folder)!r}: ") and says in message and "\n" not in message, message


def test_a_pickle_without_safetensors_is_refused_by_the_driver_check_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "evil-itm"
    shutil.copytree(models.SHAPES_ITM, folder)
    _replace_weights("pytorch_model.bin", lambda p: torch.save({"state_dict": _Payload(marker)}, p))(folder)
    with pytest.raises(UnsafeCheckpoint, match="needs code to unpickle"):
        models.check_reference(str(folder), "itm")
    assert not marker.exists()


def test_a_weights_file_that_is_a_plain_state_dict_pickle_passes(tmp_path):
    """A pickled state dict (weights_only) is what PyTorch checkpoints are: the check lets it through."""
    from safetensors.torch import load_file
    folder = tmp_path / "clip-bin"
    shutil.copytree(SHAPES_CLIP, folder)
    state = load_file(str(folder / "open_clip_model.safetensors"))
    _replace_weights("open_clip_pytorch_model.bin", lambda p: torch.save(state, p))(folder)
    models.check_reference(str(folder), "clip")


def test_the_committed_models_and_a_model_card_that_is_a_list_pass_the_driver_check(tmp_path):
    for role, source in SHAPES.items():
        models.check_reference(source, role)
    models.check_reference(SHAPES_CLIP_WEB, "clip")
    folder = tmp_path / "card"
    shutil.copytree(models.SHAPES_ITM, folder)
    (folder / "model_card.json").write_text("[]")  # documentation: the loader never reads it
    models.check_reference(str(folder), "itm")


def test_safetensors_problem_reads_only_the_header_and_the_file_length(tmp_path):
    from safetensors.torch import save_file

    from capfilt.udfs.models.safety import safetensors_problem
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.float16)}, str(path))
    assert safetensors_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    assert safetensors_problem(path).startswith("is truncated: its header describes 58 bytes of tensors")
    path.write_bytes(whole[:5])
    assert "shorter than its 8-byte header length" in safetensors_problem(path)
    header = json.loads(whole[8:8 + int.from_bytes(whole[:8], "little")])
    header["a"]["shape"] = [4, 4]  # the offsets still span 3 x 4 floats
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + whole[8 + int.from_bytes(whole[:8], "little"):])
    assert safetensors_problem(path).startswith("is corrupt: tensor 'a' (F32 [4, 4]) needs 64 bytes")


@pytest.mark.parametrize("command,stage_input,setting", [
    ("filter", "caption", "itm"),        # filter.scorer=two_step: its ITM used to be checked after Spark started
    ("filter", "caption", "clip"),
    ("caption", "download", "captioner"),
])
def test_every_model_stage_command_checks_its_models_before_spark_starts(curated_out, tmp_path, refused_before_spark,
                                                                         command, stage_input, setting):
    """`capfilt filter --set filter.scorer=two_step` (and caption) check every model reference, and every
    weights file, before Spark: exit 2, one line naming the file, no .X.inprogress or lock left."""
    import functools

    from capfilt.jobs.common import run_stage_job
    role = setting
    folder = tmp_path / "broken"
    shutil.copytree(SHAPES[role], folder)
    weights = next(folder.glob("*.safetensors"))
    _truncate(weights.name)(folder)
    key = {"itm": "filter.itm_model", "clip": "filter.model", "captioner": "caption.model"}[role]
    out = tmp_path / "out"
    main = functools.partial(run_stage_job, command)  # `capfilt <command>` (jobs/stage.py)
    err = refused_before_spark(main, ["--input", curated_out / "stages" / stage_input, "--output", out,
                                      "--set", "filter.scorer=two_step", "--set", f"filter.model={SHAPES_CLIP}",
                                      "--set", f"filter.itm_model={models.SHAPES_ITM}", "--set", f"{key}={folder}"],
                               tmp_path)
    assert f"{weights} is truncated" in err and not out.exists()


# --- tokenizer and cache ---------------------------------------------------------------------------

def test_clip_tokenizer_takes_any_untrusted_text_and_truncates(clip):
    texts = ["", "x" * 10_000, "a red circle " * 500, "\u202e\x00\ufffd😀 crimson ball", "\udcff lone surrogate"]
    tokens = clip.tokenize(texts)
    assert tuple(tokens.shape) == (len(texts), clip.context_length)
    eot = int(tokens.max())
    assert all(eot in row for row in tokens.tolist())  # every row is closed, also when truncated
    features = clip.encode_texts(texts)
    assert np.isfinite(features).all()
    # words outside the clean vocabulary are unknown, not silently mapped
    assert clip.tokenize(["crimson"])[0, 1] == clip.tokenize(["scarlet"])[0, 1]


def test_models_load_once_per_process():
    assert cached_clip(SHAPES_CLIP) is cached_clip(str(Path(SHAPES_CLIP)))
    assert cached_captioner(SHAPES_CAPTIONER) is cached_captioner(SHAPES_CAPTIONER)


# --- training code: a smoke run whose output loads through the loader -------------------------------

@pytest.mark.slow
def test_training_writes_checkpoints_the_loader_reads(tmp_path):
    from capfilt.lab.train_captioner import train as train_captioner
    from capfilt.lab.train_clip import train as train_clip
    card = train_clip(tmp_path / "clip", seed=1, steps=2, minutes=None, n_train=64, batch=16, threads=1, log=lambda m: None)
    assert card["training"]["trained_steps"] == 2
    assert load_clip(str(tmp_path / "clip")).encode_texts(["a red circle"]).shape == (1, 64)
    train_captioner(tmp_path / "cap", seed=1, steps=2, minutes=None, n_train=64, batch=16, width=32,
                    vision_layers=1, text_layers=1, threads=1, log=lambda m: None)
    assert len(load_captioner(str(tmp_path / "cap")).generate([annotated(1, 1).pil(0)], max_new_tokens=4)[0]) == 1


@pytest.mark.slow
def test_itm_training_writes_a_checkpoint_the_loader_reads(tmp_path):
    from capfilt.lab.train_itm import train as train_itm
    from capfilt.udfs.models import load_itm
    card = train_itm(tmp_path / "itm", seed=1, steps=2, minutes=None, n_train=64, batch=8, threads=1, log=lambda m: None)
    assert card["training"]["trained_steps"] == 2 and "vision tower and text layers" in card["training"]["initialised_from"]
    itm = load_itm(str(tmp_path / "itm"))
    data = annotated(2, 1)
    scores = itm.score([data.pil(0), data.pil(1)], ["a crimson ball on a snowy background", data.captions[1][0]])
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    assert itm.tokenizer.unk_token_id not in itm.tokenizer("a crimson ball | hd wallpaper").input_ids


def test_a_changed_attribute_is_exactly_that_attribute():
    from capfilt.lab.data import ATTRIBUTES, with_attribute_changed
    from capfilt.world.scene import Scene, SceneObject, attribute_differences
    scene = Scene((SceneObject("red", "circle", "small"), SceneObject("blue", "square", "large")), "white")
    rng = np.random.default_rng(0)
    for attribute in ATTRIBUTES:
        for _ in range(10):
            changed = with_attribute_changed(scene, attribute, rng)
            assert attribute_differences(scene, changed) == 1
            if attribute in ("colour", "shape", "size"):
                assert sum(getattr(a, attribute) != getattr(b, attribute)
                           for a, b in zip(scene.objects, changed.objects)) == 1
            elif attribute == "background":
                assert changed.objects == scene.objects
            else:
                assert changed.objects == scene.objects[::-1]
    with pytest.raises(ValueError, match="order needs two different objects"):
        with_attribute_changed(Scene((SceneObject("red", "circle", "small"),), "white"), "order", rng)


@pytest.mark.slow
def test_fit_learns_the_pairs_it_is_given_and_refuses_images_without_captions(tmp_path):
    import open_clip
    from transformers import PreTrainedTokenizerFast

    from capfilt.lab.metrics import recall_at_1
    from capfilt.lab.tokens import save_clip_tokenizer
    from capfilt.lab.train_clip import MEAN, STD, fit, model_config
    vocab = save_clip_tokenizer(tmp_path, context_length=32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", max_length=32, return_tensors="pt").input_ids

    data = annotated(64, 3)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    captions = [caps[:1 + i % 3] for i, caps in enumerate(data.captions)]  # 1 to 3 captions per image
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**model_config(vocab))
    with pytest.raises(ValueError, match="at least one caption"):
        fit(model, images, captions[:-1] + [[]], tokenize, steps=1, batch=16, lr=1e-3, seed=0)
    history, _ = fit(model, images, captions, tokenize, steps=120, batch=32, lr=2e-3, seed=0, log_every=10,
                     log=lambda m: None)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    model.eval()
    with torch.no_grad():
        x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        recall = recall_at_1(model.encode_image(x, normalize=True).numpy(),
                             model.encode_text(tokenize([c[0] for c in captions]), normalize=True).numpy(),
                             [s.to_json() for s in data.scenes], pool=64)
    assert recall["image_to_text"] > 0.3 and recall["text_to_image"] > 0.3  # chance is about 1/64


def test_recall_at_1_counts_hits_per_pool_and_items_of_the_same_key_as_hits():
    from capfilt.lab.metrics import recall_at_1
    eye = np.eye(4, dtype=np.float32)
    assert recall_at_1(eye, eye, ["a", "b", "c", "d"], pool=2) == {"image_to_text": 1.0, "text_to_image": 1.0}
    swapped = eye[[1, 0, 2, 3]]  # pairs 0 and 1 retrieve each other's text
    assert recall_at_1(eye, swapped, ["a", "b", "c", "d"], pool=4) == {"image_to_text": 0.5, "text_to_image": 0.5}
    assert recall_at_1(eye, swapped, ["a", "a", "c", "d"], pool=4) == {"image_to_text": 1.0, "text_to_image": 1.0}
    # text 1 sits nearer image 2 than image 1: a miss among all 4, a hit in the pool of pairs 0 and 1
    near = eye.copy()
    near[1] = 0.9 * eye[2] + 0.1 * eye[1]
    assert recall_at_1(eye, near, list("abcd"), pool=4) == {"image_to_text": 1.0, "text_to_image": 0.75}
    assert recall_at_1(eye, near, list("abcd"), pool=2) == {"image_to_text": 1.0, "text_to_image": 1.0}
    with pytest.raises(ValueError):
        recall_at_1(eye, eye, list("abcd"), pool=5)


def test_hits_at_1_are_the_per_query_recall_a_subset_is_measured_by():
    from capfilt.lab.metrics import hits_at_1, recall_at_1
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    keys = [str(i % 13) for i in range(40)]
    hits = hits_at_1(images, texts, keys, pool=10)
    assert {k: float(v.mean()) for k, v in hits.items()} == recall_at_1(images, texts, keys, pool=10)
    assert all(len(v) == 40 and v.dtype == bool for v in hits.values())
    eye = np.eye(4)
    assert hits_at_1(eye, eye[[1, 0, 2, 3]], list("abcd"), pool=4)["image_to_text"].tolist() == [False, False, True, True]
