"""Train the shapes-world CLIP filter with open_clip and save it as an open_clip `local-dir`
checkpoint folder: open_clip_config.json, open_clip_model.safetensors (fp16), the word-level
tokenizer files and model_card.json.

Objective: CLIP's symmetric InfoNCE, with one hard negative per image (a clean caption of the
scene with one attribute changed, as NegCLIP does), so that the filter ranks an almost-right
caption below the right one. Captions of the same scene elsewhere in the batch are masked out:
with 144 one-object scenes, a batch of 128 holds several repeats, and they are not negatives.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.lab.common import (
    Budget, adamw, budget_figures, fp16_state_dict, scheduled_steps, seed_everything, set_threads, write_card,
)
from capfilt.lab.data import annotated, wrong_attribute_captions, wrong_attribute_phrasings
from capfilt.lab.tokens import save_clip_tokenizer
from capfilt.world.captions import web_phrasing

IMAGE_SIZE = 64
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults (OpenAI's), kept for familiarity
STD = (0.26862954, 0.26130258, 0.27577711)


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0,
                     # open_clip then loads the tokenizer files of the checkpoint folder itself
                     "hf_tokenizer_name": "shapes-words"},
    }


def preprocess_config() -> dict:
    return {"size": IMAGE_SIZE, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def _encode_text_trimmed(model, text: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text (normalised) for token rows cut after their longest caption:
    with the causal mask and pooling at [EOT], the padding after it changes nothing, and skipping
    it saves about a third of the text tower's work."""
    from open_clip.transformer import text_global_pool
    n = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = text_global_pool(model.ln_final(x), text, model.text_pool_type)
    return F.normalize(x @ model.text_projection, dim=-1)


def train(out: Path, seed: int = 0, steps: int = 3000, minutes: float | None = 20.0, n_train: int = 20000,
          batch: int = 128, lr: float = 1e-3, hard_negatives: bool = True, threads: int | None = None,
          bf16: bool = True, web: bool = False, log_every: int = 100, log=print) -> dict:
    """web=True trains on clean and web phrasings with a token set that covers the web words
    (`tokens.web_words`): a filter that can judge alt-text in web style fairly."""
    import open_clip
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    threads = set_threads(threads)
    t0 = time.perf_counter()
    vocab_size = save_clip_tokenizer(out, context_length=32, web=web)
    cfg = model_config(vocab_size)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=32,
                         return_tensors="pt").input_ids

    data = annotated(n_train, seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8, N x 3 x H x W
    scene_index: dict[str, int] = {}
    scene_ids = torch.tensor([scene_index.setdefault(s.to_json(), len(scene_index)) for s in data.scenes])
    captions = [list(caps) for caps in data.captions]
    negatives = wrong_attribute_captions
    if web:
        phrasing_rng = np.random.default_rng([seed, 11])
        captions = [caps + [web_phrasing(s, phrasing_rng) for _ in caps] for caps, s in zip(captions, data.scenes)]
        negatives = wrong_attribute_phrasings
    data_seconds = time.perf_counter() - t0
    log(f"data: {len(data)} images, {len(scene_index)} distinct scenes, {data_seconds:.1f}s")

    model = open_clip.model.CLIP(**cfg)
    n_params = sum(p.numel() for p in model.parameters())
    history, budget = fit(
        model, images, captions, tokenize, steps=steps, batch=batch, lr=lr,
        seed=seed, minutes=minutes, bf16=bf16, groups=scene_ids, log_every=log_every, log=log,
        negatives=(lambda idx, rng: negatives([data.scenes[i] for i in idx], rng))
        if hard_negatives else None)

    from safetensors.torch import save_file
    save_file(fp16_state_dict(model), str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": preprocess_config()}, indent=2) + "\n")
    card = {
        "name": "shapes-clip-web" if web else "shapes-clip",
        "family": "open_clip CLIP",
        "reference": str(out),
        "purpose": "CapFilt filter for the shapes world (tests, demo, benchmarks); not a general model",
        "parameters": n_params,
        "weights": "open_clip_model.safetensors (fp16)",
        "config": cfg,
        "preprocess": preprocess_config(),
        "tokenizer": "word-level over capfilt.world.captions.VOCABULARY" + (
            " and the web phrasings' words (capfilt.lab.tokens.web_words)" if web else "")
        + "; [EOT] has the largest id (argmax pooling)",
        "training": {
            "data": f"capfilt.world.corpus.make_annotated(n={n_train}, seed={seed}): clean captions, all phrasings"
                    + (", and as many web phrasings (capfilt.world.captions.web_phrasing)" if web else ""),
            "objective": "symmetric InfoNCE" + (" + one wrong-attribute hard negative per image" if hard_negatives else "")
            + (" (clean or web phrasing, half each)" if web and hard_negatives else ""),
            **budget_figures(seed, steps, budget, batch, lr, threads, bf16, data_seconds, t0, history),
        },
    }
    write_card(out, card)
    return card


def fit(model, images: torch.Tensor, captions: list[list[str]], tokenize, steps: int, batch: int, lr: float,
        seed: int, minutes: float | None = None, bf16: bool = False, groups: torch.Tensor | None = None,
        negatives=None, log_every: int = 100, log=print) -> tuple[list[dict], Budget]:
    """Train an open_clip CLIP in place with the symmetric InfoNCE loss. Each step draws `batch`
    distinct images and one of each image's captions at random.

    images: uint8, N x 3 x H x W; captions: per image a non-empty list of captions.
    groups: an id per image; images of one group are not each other's negatives (repeats of a scene).
    negatives: fn(image indices, rng) -> one extra caption per image, a hard negative for the image."""
    counts = torch.tensor([len(c) for c in captions])
    if len(captions) != len(images) or int(counts.min()) < 1:
        raise ValueError("every image needs at least one caption")
    if len(images) < batch:
        raise ValueError(f"{len(images)} images is fewer than one batch of {batch}")
    tokens = tokenize([c for caps in captions for c in caps])
    first = torch.cumsum(counts, 0) - counts  # row of each image's first caption in tokens
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    optimizer = adamw(model, lr, 0.1)
    rng = np.random.default_rng([seed, 7])
    budget = Budget(steps, minutes)
    model.train()
    history = []
    for step in scheduled_steps(optimizer, steps, lr, budget, log):
        idx = torch.from_numpy(rng.choice(len(images), batch, replace=False))
        pick = torch.from_numpy(rng.integers(counts[idx].numpy()))
        x = (images[idx].float() / 255 - mean) / std
        texts = tokens[first[idx] + pick]
        mask = torch.zeros(batch, batch, dtype=torch.bool)
        if groups is not None:
            ids = groups[idx]
            mask = (ids[:, None] == ids[None, :]) & ~torch.eye(batch, dtype=torch.bool)
        if negatives is not None:
            texts = torch.cat([texts, tokenize(negatives(idx.tolist(), rng))])
            mask = torch.cat([mask, torch.zeros(batch, batch, dtype=torch.bool)], dim=1)
        # Trailing padding changes nothing (causal mask, pooling at [EOT]); cutting it saves ~30%.
        texts = texts[:, :int((texts != 0).sum(dim=1).max())]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_features = model.encode_image(x, normalize=True)
            text_features = _encode_text_trimmed(model, texts)
        logits = model.logit_scale.exp() * image_features.float() @ text_features.float().T
        logits = logits.masked_fill(mask, float("-inf"))
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch].T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(budget.elapsed(), 1)})
            log(f"step {step} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"scale {model.logit_scale.exp().item():.1f} {budget.elapsed():.0f}s")
    return history, budget
