"""`python -m capfilt.lab finetune`: pairs read from a curated OUT, a WebDataset and Parquet; each kind
fine-tuned from the shapes models writes a folder the one loader reads; a BLIP-base-size captioner's loss
falls; bad input is one line before any training."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.lab.cli import main as lab
from capfilt.lab.finetune import finetune
from capfilt.lab.pairs import read_pairs
from capfilt.world.corpus import make_annotated

REPO = Path(__file__).resolve().parents[1]
MODELS = {"captioner": REPO / "models" / "shapes-captioner", "itm": REPO / "models" / "shapes-itm",
          "clip": REPO / "models" / "shapes-clip"}


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> Path:
    """40 clean annotated images (5 phrasings each) with a wrong-attribute caption each as `negatives`."""
    from capfilt.lab.data import wrong_attribute_captions
    from capfilt.world.scene import Scene
    folder = tmp_path_factory.mktemp("annotated")
    table = pq.read_table(make_annotated(str(folder), 40, 3))
    scenes = [Scene.from_json(s) for s in table.column("scene").to_pylist()]
    negatives = [[c] for c in wrong_attribute_captions(scenes, np.random.default_rng(0))]
    path = folder / "pairs.parquet"
    pq.write_table(pa.table({"image": table.column("image"), "captions": table.column("captions"),
                             "negatives": negatives}), path)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def test_pairs_from_a_curated_out_a_webdataset_and_parquet_count_what_they_leave_out(annotated, tmp_path):
    rows = pq.read_table(annotated).to_pylist()
    image = [r["image"] for r in rows]
    # a WebDataset: .txt captions, an export's .json with kept and rejected candidates, one without a
    # caption, one whose image is not an image
    _tar(tmp_path / "shard-00000.tar", {
        "a/0.jpg": image[0], "a/0.txt": b"a red circle",
        "a/1.jpg": image[1], "a/1.json": json.dumps({"candidates": [
            {"text": "kept one", "kept": True}, {"text": "rejected one", "kept": False}]}).encode(),
        "a/2.jpg": image[2],
        "a/3.jpg": b"not a jpeg", "a/3.txt": b"a caption"})
    # a curated OUT: positives are the primary and the kept candidates, negatives the rejected ones
    out = tmp_path / "out"
    (out / "curated").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"stage": "curate", "finished_at": "then", "models": {}}))
    candidates = [{"text": "web", "source": "web", "score": 0.1, "kept": False},
                  {"text": "synthetic", "source": "synthetic", "score": 0.9, "kept": True}]
    pq.write_table(pa.table({"image": [image[3]], "candidates": [candidates], "caption_primary": ["synthetic"]}),
                   out / "curated" / "part-0.parquet")
    # a `captions` column holding a string is one caption, not one per character
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"image": [image[4]], "captions": ["a blue square"]}), one)
    assert read_pairs([str(one)]).positives == [["a blue square"]]
    pairs = read_pairs([str(tmp_path / "shard-00000.tar"), str(out), str(annotated)])
    assert len(pairs) == 2 + 1 + 40
    assert pairs.positives[:3] == [["a red circle"], ["kept one"], ["synthetic"]]
    assert pairs.negatives[:3] == [[], ["rejected one"], ["web"]]
    assert pairs.positives[3] == rows[0]["captions"] and len(pairs.negatives[3]) == 1
    web, curated, parquet = pairs.sources
    assert (web["kind"], web["records"], web["pairs"], web["without_caption"], web["unreadable_image"],
            web["with_negatives"]) == ("webdataset", 4, 2, 1, 1, 1)
    assert (curated["kind"], curated["pairs"], curated["finished_at"]) == ("curated", 1, "then")
    assert (parquet["kind"], parquet["pairs"], parquet["with_negatives"]) == ("parquet", 40, 40)
    assert pairs.pil(0).size == (64, 64)


@pytest.mark.parametrize("kind", ["captioner", "itm", "clip"])
def test_finetune_from_the_shapes_models_writes_a_folder_the_loader_reads(kind, annotated, tmp_path):
    from capfilt.udfs.models import check_reference, load_captioner, load_clip, load_itm
    out = tmp_path / kind
    card = finetune(kind, str(MODELS[kind]), [str(annotated)], out, steps=3, batch=8, lr=1e-4, heldout=8,
                    threads=1, log=lambda *a: None)
    assert not out.with_name(f"{kind}.partial").exists()
    assert json.loads((out / "model_card.json").read_text()) == card
    tuned = card["finetuned"]
    assert tuned["init"] == str(MODELS[kind]) and tuned["data"][0]["path"] == str(annotated)
    assert (tuned["trained_steps"], tuned["pairs_trained_on"], len(tuned["loss_history"])) == (3, 32, 3)
    assert tuned["init_card"]["reference"]  # the shapes model's own card, named
    heldout = card["metrics"]["heldout"]
    assert heldout["pairs"] == 8 and set(heldout["before"]) == set(heldout["after"])
    check_reference(str(out), kind)  # the driver's check refuses nothing finetune wrote
    image = read_pairs([str(annotated)]).pil(0)
    if kind == "captioner":
        assert set(heldout["after"]) == {"loss", "exact_caption_rate"}
        assert load_captioner(str(out)).generate([image], seeds=[0])[0][0]
    elif kind == "itm":
        assert set(heldout["after"]) == {"auc_other_image", "auc_rejected", "fit_accuracy"}
        assert 0 <= load_itm(str(out)).score([image], ["a red circle"])[0] <= 1
    else:
        assert set(heldout["after"]) == {"auc_other_image", "auc_rejected", "recall_at_1"}
        assert load_clip(str(out)).encode_images([image]).shape == (1, 64)
        # a round two from round one: the manifest's models entry names both rounds and their data
        from capfilt.pipelines.stage import with_lineage
        again = tmp_path / "round2"
        finetune(kind, str(out), [str(annotated)], again, steps=1, batch=8, lr=1e-4, heldout=0, log=lambda *a: None)
        models = with_lineage({"clip": str(again), "rule": "threshold", "itm": str(MODELS["itm"])})
        assert [(r["model"], r["init"], r["data"][0]["path"]) for r in models["lineage"][str(again)]] == [
            (str(again), str(out), str(annotated)), (str(out), str(MODELS[kind]), str(annotated))]
        assert set(models["lineage"]) == {str(again)}  # the shapes ITM was trained, not fine-tuned


@pytest.mark.slow
def test_a_blip_base_size_captioner_from_random_init_learns_and_loads(annotated, tmp_path):
    """BLIP-base's widths and depths (ViT-B/16 vision, a 12-layer BERT decoder with cross-attention), at
    96 px and over the shapes words, initialised at random: a few steps on one repeated batch lower the
    loss, and the fine-tuned folder loads through the one loader."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from capfilt.lab.tokens import save_blip_processor
    from capfilt.udfs.models import check_reference, load_captioner
    init = tmp_path / "blip-base-random"
    tokenizer = save_blip_processor(init, 96, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)).tokenizer
    config = BlipConfig(vision_config={"image_size": 96, "patch_size": 16},
                        text_config={"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                     "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
                                     "eos_token_id": tokenizer.sep_token_id})
    model = BlipForConditionalGeneration(config)
    assert (model.config.vision_config.hidden_size, model.config.vision_config.num_hidden_layers,
            model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers) == (768, 12, 768, 12)
    model.save_pretrained(str(init), safe_serialization=True)
    del model
    data = tmp_path / "four.parquet"
    rows = pq.read_table(annotated).slice(0, 4)
    pq.write_table(pa.table({"image": rows.column("image"), "caption": [c[0] for c in rows.column("captions").to_pylist()]}),
                   data)
    out = tmp_path / "tuned"
    card = finetune("captioner", str(init), [str(data)], out, steps=4, batch=4, lr=1e-4, heldout=0, threads=2,
                    log=lambda *a: None)
    losses = [h["loss"] for h in card["finetuned"]["loss_history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert card["metrics"]["heldout"]["pairs"] == 0 and card["parameters"] > 150_000_000
    check_reference(str(out), "captioner")
    assert len(load_captioner(str(out)).generate([read_pairs([str(data)]).pil(0)], max_new_tokens=5)[0]) == 1


@pytest.mark.slow
def test_itm_finetuned_on_a_curated_out_by_two_processes_learns_from_the_rejected_captions(curated_out, tmp_path):
    """Two processes (DistributedDataParallel, gloo on CPU, as torchrun starts them but meeting through a file
    and loopback sockets rather than a TCP store that listens on every interface) average their gradients;
    rank 0 alone writes; the curated OUT's rejected captions are the hard negatives, and the held-out AUC
    over them is measured."""
    import os
    out = tmp_path / "itm"
    argv = [sys.executable, "-m", "capfilt.lab", "finetune", "itm", "--init", str(MODELS["itm"]), "--data",
            str(curated_out), "--out", str(out), "--steps", "2", "--batch", "4", "--heldout", "20"]
    env = {**os.environ, "WORLD_SIZE": "2", "CAPFILT_DIST_INIT": f"file://{tmp_path / 'rendezvous'}",
           "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=600) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["finetuned"]["processes"] == 2
    assert card["finetuned"]["data"][0]["kind"] == "curated" and card["finetuned"]["data"][0]["with_negatives"] > 0
    assert "auc_rejected" in card["metrics"]["heldout"]["after"]
    assert "fine-tuned itm" in results[0][0] and "fine-tuned itm" not in results[1][0]  # rank 0 alone writes


def _refusal(capsys, argv) -> str:
    assert lab(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("capfilt: error: ")
    return err


def test_bad_input_is_one_line_before_any_training(annotated, tmp_path, capsys, monkeypatch):
    import capfilt.lab.finetune as ft
    monkeypatch.setattr(ft, "_load", lambda *a: pytest.fail("a model was built"))
    base = ["finetune", "itm", "--init", str(MODELS["itm"]), "--out", str(tmp_path / "new")]
    images_only = tmp_path / "images-only.parquet"
    pq.write_table(pq.read_table(annotated, columns=["image"]), images_only)
    assert "needs an `image` column and a `caption`" in _refusal(capsys, [*base, "--data", str(images_only)])
    no_captions = tmp_path / "no-captions.parquet"
    pq.write_table(pa.table({"image": pq.read_table(annotated).column("image"), "caption": [""] * 40}), no_captions)
    assert "no (image, caption) pair in 40 records (40 without a caption" in \
        _refusal(capsys, [*base, "--data", str(no_captions)])
    assert "does not exist" in _refusal(capsys, [*base, "--data", str(tmp_path / "missing")])
    broken = tmp_path / "broken-itm"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "broken-itm" in _refusal(capsys, ["finetune", "itm", "--init", str(broken), "--data", str(annotated),
                                             "--out", str(tmp_path / "new")])
    assert "an ITM model is" in _refusal(capsys, ["finetune", "itm", "--init", str(MODELS["clip"]), "--data",
                                             str(annotated), "--out", str(tmp_path / "new")])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "weights").write_text("someone's")
    assert "exists" in _refusal(capsys, ["finetune", "itm", "--init", str(MODELS["itm"]), "--data", str(annotated),
                                         "--out", str(taken)])
    assert "--steps 0" in _refusal(capsys, [*base, "--data", str(annotated), "--steps", "0"])
    assert "--neighbours -1" in _refusal(capsys, [*base, "--data", str(annotated), "--neighbours", "-1"])
    assert not (tmp_path / "new").exists() and (taken / "weights").read_text() == "someone's"
