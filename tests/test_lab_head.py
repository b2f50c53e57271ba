"""The committed watermark head (models/shapes-watermark-head): its card and weights agree, it is tied to
the shapes CLIP it was trained on, and it separates watermarked from clean images embedded the way the
filter stage embeds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from capfilt.udfs.heads import weights_sha256
from capfilt.lab.head import CARD, WEIGHTS, build_head, head_scores, load_head
from capfilt.lab.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]
HEAD = REPO / "models" / "shapes-watermark-head"
CARD_KEYS = {"name", "architecture", "input_dim", "output", "threshold", "direction", "embedding_model",
             "description", "trained_on", "metrics"}


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((HEAD / CARD).read_text())


def test_card_and_weights_agree_and_name_the_shapes_clip(card):
    assert set(card) - {"hidden", "activation"} == CARD_KEYS
    assert card["name"] == "watermark" and card["output"] == "sigmoid" and card["direction"] == "above"
    assert 0 < card["threshold"] < 1 and card["input_dim"] == 64
    assert card["embedding_model"] == {
        "reference": "models/shapes-clip",
        "sha256": weights_sha256(REPO / "models" / "shapes-clip" / "open_clip_model.safetensors")}
    assert (HEAD / WEIGHTS).stat().st_size <= 1_000_000
    state = load_file(str(HEAD / WEIGHTS))
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in state.values())  # float32
    if card["architecture"] == "linear":
        assert {k: tuple(v.shape) for k, v in state.items()} == {"weight": (1, 64), "bias": (1,)}
    else:
        assert card["architecture"] == "mlp" and card["activation"] == "relu"
        widths = [64, *card["hidden"], 1]
        expected = {}
        for i, (a, b) in enumerate(zip(widths, widths[1:])):  # Linear, activation, Linear, ...
            expected[f"layers.{2 * i}.weight"], expected[f"layers.{2 * i}.bias"] = (b, a), (b,)
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
    build_head(card["architecture"], 64, card.get("hidden")).load_state_dict(state, strict=True)
    metrics = card["metrics"]
    assert {"heldout_seed", "precision", "recall", "auc"} <= set(metrics)
    assert metrics["heldout_seed"] not in (card["trained_on"]["train_seed"], card["trained_on"]["validation_seed"])


def test_the_download_settings_the_head_was_trained_at_are_the_shapes_world_s():
    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.lab.train_head import STORED
    from capfilt.pipelines.config import load_config
    download = shapes_world_settings(load_config(None, [])).download
    assert {k: getattr(download, k) for k in STORED} == STORED


def test_the_head_separates_watermarked_from_clean_images_on_a_fresh_seed():
    import torch

    from capfilt.lab.train_head import watermark_data
    from capfilt.udfs.models import SHAPES_CLIP, load_clip
    torch.set_num_threads(1)
    head, card = load_head(HEAD)
    x, y = watermark_data(load_clip(SHAPES_CLIP, "cpu"), 120, seed=20_123)  # neither a training nor the card's seed
    assert len(y) == 120 and 40 <= y.sum() <= 80
    norms = np.linalg.norm(x, axis=1)
    assert np.allclose(norms, 1, atol=2e-3)  # float16 of a unit vector, as stored
    scores = head_scores(head, x)
    assert roc_auc(scores[y == 1], scores[y == 0]) > 0.75
    flagged = scores > card["threshold"]
    assert flagged.sum() >= 10 and y[flagged].mean() >= 0.8  # what it flags is mostly watermarked
