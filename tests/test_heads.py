"""Embedding heads: the loader (LAION's aesthetic predictor architecture, linear, MLP), its refusals, and
the heads stage on a curated run (scores from the stored embeddings, drop and flag modes)."""
import functools
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from capfilt.jobs.common import run_stage_job
from capfilt.udfs.heads import HeadError, check_embedding_model, embeddings_from_bytes, load_head, weights_sha256
from capfilt.udfs.models import MODELS_DIR, SHAPES_CLIP

CLIP_SHA = weights_sha256(f"{SHAPES_CLIP}/open_clip_model.safetensors")


def laion_aesthetic_mlp(dim: int) -> torch.nn.Module:
    """LAION's improved aesthetic predictor, layer for layer (christophschuhmann/improved-aesthetic-predictor)."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)
    return MLP()


def write_head(folder, state: dict, **card):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "head.safetensors"))
    card = {"name": "h", "architecture": "linear", "threshold": 0.5, "direction": "above",
            "embedding_model": {"reference": "models/shapes-clip", "sha256": CLIP_SHA}} | card
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("as_pth", [False, True])
def test_laion_aesthetic_architecture_scores_equal_torch(tmp_path, as_pth):
    torch.manual_seed(0)
    model = laion_aesthetic_mlp(768).eval()
    card = {"name": "aesthetic", "architecture": "laion_aesthetic", "input_dim": 768, "output": "identity",
            "threshold": 5.0, "direction": "below", "embedding_model": {"reference": "ViT-L-14:openai"}}
    if as_pth:  # LAION ships a state dict saved by torch.save (loaded with weights_only: no code runs)
        folder = tmp_path / "aesthetic"
        folder.mkdir()
        torch.save(model.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
        (folder / "card.json").write_text(json.dumps(card))
    else:
        folder = write_head(tmp_path / "aesthetic", model.state_dict(), **card)
    head = load_head(folder)
    x = torch.nn.functional.normalize(torch.randn(64, 768), dim=-1)
    with torch.no_grad():
        expected = model(x)[:, 0].numpy()
    got = head.scores(x.numpy())
    assert np.abs(got - expected).max() < 1e-5
    assert list(head.flagged(np.array([4.0, 6.0]))) == [True, False]  # direction below: low aesthetics flagged


def test_linear_and_mlp_heads_match_torch(tmp_path):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 1)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 1))
    x = torch.randn(50, 64)
    lin = load_head(write_head(tmp_path / "lin", linear.state_dict()))
    deep = load_head(write_head(tmp_path / "mlp", {f"layers.{k}": v for k, v in mlp.state_dict().items()},
                                architecture="mlp", hidden=[32, 8], activation="relu"))
    with torch.no_grad():
        assert np.abs(lin.scores(x.numpy()) - torch.sigmoid(linear(x))[:, 0].numpy()).max() < 1e-6
        assert np.abs(deep.scores(x.numpy()) - torch.sigmoid(mlp(x))[:, 0].numpy()).max() < 1e-6


def test_heads_that_do_not_fit_are_refused_with_one_line(tmp_path):
    good = {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}
    with pytest.raises(HeadError, match="no card.json"):
        folder = tmp_path / "nocard"
        folder.mkdir()
        save_file(good, str(folder / "head.safetensors"))
        load_head(folder)
    with pytest.raises(HeadError, match="do not match architecture laion_aesthetic"):
        load_head(write_head(tmp_path / "a", good, architecture="laion_aesthetic"))
    with pytest.raises(HeadError, match="input_dim 512"):
        load_head(write_head(tmp_path / "b", good, input_dim=512))
    with pytest.raises(HeadError, match="architecture 'resnet'"):
        load_head(write_head(tmp_path / "c", good, architecture="resnet"))
    with pytest.raises(HeadError, match="name"):
        load_head(write_head(tmp_path / "d", good, name="../x y"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"weight": torch.zeros(1, 64), "bias": torch.zeros(1), "code": HeadError("x")}, pickled / "h.pth")
    (pickled / "card.json").write_text((tmp_path / "a" / "card.json").read_text())
    with pytest.raises(HeadError, match="needs code to unpickle"):
        load_head(pickled)


def test_a_head_for_another_clip_is_refused(tmp_path):
    head = load_head(write_head(tmp_path / "h", {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}))
    check_embedding_model(head, str(SHAPES_CLIP))  # the sha256 of its weights file matches
    link = tmp_path / "link"
    link.symlink_to(SHAPES_CLIP, target_is_directory=True)
    check_embedding_model(head, str(link))
    with pytest.raises(HeadError, match="trained on embeddings of models/shapes-clip"):
        check_embedding_model(head, "ViT-B-32:laion2b_s34b_b79k")
    other = tmp_path / "other-clip"
    other.mkdir()
    (other / "open_clip_model.safetensors").write_bytes(b"not those weights")
    with pytest.raises(HeadError, match="this run's CLIP is"):
        check_embedding_model(head, str(other))
    named = load_head(write_head(tmp_path / "n", {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)},
                                 embedding_model={"reference": "ViT-L-14:openai"}))
    check_embedding_model(named, "ViT-L-14:openai")
    with pytest.raises(HeadError):
        check_embedding_model(named, "ViT-B-32:openai")


def test_thresholds_override_cards_by_name_and_names_must_differ(tmp_path):
    from types import SimpleNamespace

    from capfilt.pipelines.heads import load_heads
    w = {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}
    a, b = write_head(tmp_path / "a", w, name="wm"), write_head(tmp_path / "b", w, name="nsfw")
    heads = load_heads(SimpleNamespace(heads=SimpleNamespace(drop=[str(a)], flag=[str(b)], thresholds={"nsfw": 0.2})))
    assert [(h.name, h.threshold, mode) for h, mode in heads] == [("wm", 0.5, "drop"), ("nsfw", 0.2, "flag")]
    with pytest.raises(HeadError, match="both named 'wm'"):
        load_heads(SimpleNamespace(heads=SimpleNamespace(drop=[str(a)], flag=[str(a)], thresholds={})))
    with pytest.raises(HeadError, match="names typo"):
        load_heads(SimpleNamespace(heads=SimpleNamespace(drop=[str(a)], flag=[], thresholds={"typo": 0.1})))


def test_embeddings_from_bytes_reads_the_stored_float16():
    e = np.random.default_rng(0).normal(size=(3, 8)).astype("<f2")
    got = embeddings_from_bytes([e[0].tobytes(), None, e[2].tobytes()])
    assert np.array_equal(got[0], e[0].astype(np.float32)) and np.isnan(got[1]).all()


@pytest.mark.slow
def test_heads_stage_scores_stored_embeddings_drops_and_flags(curated_out, tmp_path, spark):
    """On a committed filter output: a drop head and a flag head (random linear heads over the shapes
    CLIP's embeddings). Scores equal the head applied to the stored embeddings; rows are conserved; a
    changed threshold recomputes without decoding an image."""
    heads = functools.partial(run_stage_job, "heads")
    torch.manual_seed(3)
    w = torch.randn(1, 64)
    drop = write_head(tmp_path / "drop", {"weight": w, "bias": torch.zeros(1)}, name="darkness", threshold=0.6)
    flag = write_head(tmp_path / "flag", {"weight": -w, "bias": torch.zeros(1)}, name="brightness")
    out = tmp_path / "heads"
    args = ["--input", str(curated_out / "stages" / "filter"), "--output", str(out),
            "--set", f"heads.drop=[{drop}]", "--set", f"heads.flag=[{flag}]",
            "--set", f"filter.model={SHAPES_CLIP}"]
    assert heads(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == counts["output"] + counts["rejected_total"]
    assert manifest["figures"]["decoded_images"] == 0 and manifest["models"]["heads"]["darkness"]["mode"] == "drop"
    from capfilt.pipelines.stage import Chain, view
    chain = Chain.of(str(out), manifest, 0)
    rows = view(spark, chain).select("uid", "image_embedding", "head_scores").toPandas()
    emb = embeddings_from_bytes(rows["image_embedding"])
    expected = 1 / (1 + np.exp(-(emb.astype(np.float64) @ w.numpy()[0].astype(np.float64))))
    got = np.array([{s["name"]: s["score"] for s in hs}["darkness"] for hs in rows["head_scores"]])
    assert np.abs(got - expected).max() < 1e-5 and (got <= 0.6).all()
    rejects = spark.read.parquet(str(out / "rejects")).toPandas()
    assert (rejects["reason"] == "darkness").sum() == counts["rejected"]["heads"]["darkness"] > 0
    assert rejects["detail"].str.match(r"darkness score 0\.\d{4} > 0\.6").all()
    # a head made for another CLIP stops the job before Spark with one line
    shutil.copytree(flag, tmp_path / "wrong")
    card = json.loads((tmp_path / "wrong" / "card.json").read_text())
    (tmp_path / "wrong" / "card.json").write_text(json.dumps(card | {"embedding_model": {"reference": "ViT-L-14:openai"}}))
    from capfilt.jobs.common import run
    assert run(heads, [*args[:3], str(tmp_path / "h2"), "--set", f"heads.flag=[{tmp_path / 'wrong'}]",
                       "--set", f"filter.model={SHAPES_CLIP}"]) == 2


# --- broken heads: refused on the driver, one line naming the head folder and the field ---------------

WATERMARK = MODELS_DIR / "shapes-watermark-head"


def _broken_head(tmp_path, name: str, weights=None, **card):
    """A copy of the committed watermark head; `weights(folder)` replaces its weights, `card` its fields."""
    folder = tmp_path / name
    shutil.copytree(WATERMARK, folder)
    if weights is not None:
        (folder / "head.safetensors").unlink()
        weights(folder)
    if card:
        fields = json.loads((folder / "card.json").read_text())
        (folder / "card.json").write_text(json.dumps(fields | card))
    return folder


def _state(value):
    return lambda folder: torch.save(value, folder / "head.pth")


def _non_finite(value, as_pth: bool = False):
    """The watermark head's weights with one non-finite value."""
    def write(folder):
        from safetensors.torch import load_file
        state = load_file(str(WATERMARK / "head.safetensors"))
        state["layers.2.weight"][0, 0] = value
        if as_pth:
            torch.save(state, folder / "head.pth")
        else:
            save_file(state, str(folder / "head.safetensors"))
    return write


@pytest.mark.parametrize("weights,says", [
    (_non_finite(float("nan")), "head.safetensors: layers.2.weight holds non-finite values"),
    (_non_finite(float("inf")), "head.safetensors: layers.2.weight holds non-finite values"),
    (_non_finite(float("-inf"), as_pth=True), "head.pth: layers.2.weight holds non-finite values"),
])
def test_a_head_with_non_finite_weights_is_refused_naming_the_head_folder(tmp_path, weights, says):
    folder = _broken_head(tmp_path, "h", weights)
    with pytest.raises(HeadError) as error:
        load_head(folder)
    assert str(error.value).startswith(f"head {folder}: {says}") and "\n" not in str(error.value)


@pytest.mark.parametrize("weights,card,says", [
    (_state(torch.zeros(1, 64)), {}, "head.pth holds a Tensor, not a state dict"),
    (_state(3), {}, "head.pth holds an int, not a state dict"),
    (_state({"state_dict": [1]}), {}, "head.pth is not a state dict of tensors: its entry 'state_dict' is a list"),
    (_state({"weight": 1, "bias": [0]}), {}, "head.pth is not a state dict of tensors: its entry 'weight' is an int"),
    (lambda f: (f / "head.pth").write_bytes(b"PK\x03\x04" + bytes(200)), {}, "head.pth is not a readable PyTorch"),
    (lambda f: (f / "head.pth").write_bytes(bytes(range(256))), {}, "head.pth is not a PyTorch checkpoint"),
    (lambda f: (f / "head.safetensors").write_bytes((WATERMARK / "head.safetensors").read_bytes()[:-64]), {},
     "head.safetensors is truncated"),
    (lambda f: (f / "head.safetensors").mkdir(), {}, "head.safetensors is a folder, not a weights file"),
    (None, {"threshold": [0.5]}, "card.json threshold must be a finite number, not [0.5]"),
    (None, {"threshold": "abc"}, "card.json threshold must be a finite number, not 'abc'"),
    (None, {"threshold": float("nan")}, "card.json threshold must be a finite number"),
    (None, {"threshold": True}, "card.json threshold must be a finite number"),
    (None, {"activation": ["relu"]}, "card.json activation must be a string"),
    (None, {"direction": "up"}, "card.json direction 'up' is not one of above, below"),
    (None, {"hidden": "384"}, "card.json hidden must be a list of positive integers"),
    (None, {"input_dim": "64"}, "card.json input_dim must be a positive integer"),
    (None, {"embedding_model": ["models/shapes-clip"]}, "card.json embedding_model must be a reference"),
])
def test_malformed_heads_are_one_line_naming_the_folder_and_the_field(tmp_path, weights, card, says):
    folder = _broken_head(tmp_path, "h", weights, **card)
    with pytest.raises(HeadError) as error:
        load_head(folder)
    assert str(error.value).startswith(f"head {folder}: {says}") and "\n" not in str(error.value)


def test_a_card_that_is_not_an_object_is_one_line(tmp_path):
    folder = _broken_head(tmp_path, "h")
    (folder / "card.json").write_text("[]")
    with pytest.raises(HeadError, match=r"card.json must hold an object, not a list"):
        load_head(folder)


def test_the_committed_head_loads_with_finite_weights():
    head = load_head(WATERMARK)
    assert head.name == "watermark" and all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in head.layers)


@pytest.mark.parametrize("problem", ["nan_weights", "threshold_abc", "bare_tensor", "missing"])
def test_the_heads_command_refuses_a_broken_head_before_spark_starts(curated_out, tmp_path, refused_before_spark,
                                                                    problem):
    """`capfilt heads` checks its heads before Spark (it used to start Spark first, 21-35 s): exit 2, one line
    naming the head folder, no .heads.inprogress or lock left."""
    main = functools.partial(run_stage_job, "heads")
    if problem == "missing":
        folder = tmp_path / "no-such-head"
    else:
        folder = _broken_head(tmp_path, "h", *{
            "nan_weights": (_non_finite(float("nan")),), "threshold_abc": (None,),
            "bare_tensor": (_state(torch.zeros(1, 64)),)}[problem],
            **({"threshold": "abc"} if problem == "threshold_abc" else {}))
    out = tmp_path / "out"
    err = refused_before_spark(main, ["--input", curated_out / "stages" / "filter", "--output", out,
                                      "--set", f"heads.drop=[{folder}]", "--set", f"filter.model={SHAPES_CLIP}"],
                               tmp_path)
    assert f"head {folder}" in err and not out.exists()


@pytest.mark.slow
def test_a_non_finite_score_at_run_time_is_an_error_naming_the_head_not_a_null(curated_out, tmp_path, capsys):
    """Finite weights that overflow (1e308 per weight, identity output): the stage used to write null scores
    and drop nothing, exit 0. Now it stops, naming the head, and commits nothing."""
    from capfilt.jobs.common import run
    main = functools.partial(run_stage_job, "heads")
    huge = write_head(tmp_path / "huge", {"weight": torch.full((1, 64), 1e308, dtype=torch.float64),
                                         "bias": torch.zeros(1, dtype=torch.float64)},
                      name="overflow", output="identity")
    out = tmp_path / "out"
    assert run(main, ["--input", str(curated_out / "stages" / "filter"), "--output", str(out),
                      "--set", f"heads.drop=[{huge}]", "--set", f"filter.model={SHAPES_CLIP}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt: error: head overflow gave no finite score to ") and err.count("\n") == 1, err
    assert not (out / "manifest.json").exists()
