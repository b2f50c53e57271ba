"""Train the shapes-world captioner: a tiny BLIP (transformers' BlipForConditionalGeneration) whose
text decoder cross-attends to every patch token of the image, as in BLIP's CapFilt captioner.
Saved with save_pretrained (fp16 safetensors) next to its BlipProcessor, i.e. in the same form as
Salesforce/blip-image-captioning-large, and loaded by the same code.

Objective: language modelling of one clean caption per image (a random phrasing each time), the
decoder starting from BLIP's [DEC] token as BlipForConditionalGeneration.generate does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from capfilt.lab.common import Budget, adamw, budget_figures, scheduled_steps, seed_everything, set_threads, write_card
from capfilt.lab.data import annotated
from capfilt.lab.tokens import save_blip_processor
from capfilt.world.captions import N_PHRASINGS

IMAGE_SIZE = 64
MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP's own image processor defaults (OpenAI CLIP's)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 40


def blip_config(tokenizer, width: int = 128, vision_layers: int = 3, text_layers: int = 3):
    from transformers import BlipConfig
    vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": vision_layers,
              "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8, "attention_dropout": 0.0,
              # BLIP's default (1e-10) expects a pretrained ViT to be loaded over it; from scratch it
              # leaves the position and class embeddings at zero
              "initializer_range": 0.02}
    text = {"vocab_size": len(tokenizer), "hidden_size": width, "encoder_hidden_size": width,
            "intermediate_size": 2 * width, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "max_position_embeddings": MAX_TOKENS, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=width)


def train(out: Path, seed: int = 0, steps: int = 4000, minutes: float | None = 20.0, n_train: int = 20000,
          batch: int = 96, lr: float = 1e-3, width: int = 128, vision_layers: int = 3, text_layers: int = 3,
          threads: int | None = None, bf16: bool = True, log_every: int = 100, log=print) -> dict:
    from transformers import BlipForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    threads = set_threads(threads)
    t0 = time.perf_counter()
    processor = save_blip_processor(out, IMAGE_SIZE, MEAN, STD)
    tokenizer = processor.tokenizer
    data = annotated(n_train, seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    flat = [c for caps in data.captions for c in caps]
    ids = tokenizer(flat, padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids[:, 0] = tokenizer.bos_token_id  # [CLS] -> [DEC]: the decoder's start token
    ids = ids.view(len(data), N_PHRASINGS, -1)
    if (ids == tokenizer.unk_token_id).any():
        raise RuntimeError("a clean caption has a word outside the captioner's vocabulary")
    data_seconds = time.perf_counter() - t0
    log(f"data: {len(data)} images, caption tokens up to {ids.shape[-1]}, {data_seconds:.1f}s")

    config = blip_config(tokenizer, width, vision_layers, text_layers)
    model = BlipForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(model, lr, 0.05)
    rng = np.random.default_rng([seed, 7])
    budget = Budget(steps, minutes)
    model.train()
    history = []
    for step in scheduled_steps(optimizer, steps, lr, budget, log):
        idx = torch.from_numpy(rng.choice(len(data), batch, replace=False))
        phrasing = torch.from_numpy(rng.integers(N_PHRASINGS, size=batch))
        x = (images[idx].float() / 255 - mean) / std
        input_ids = ids[idx, phrasing]
        length = int((input_ids != tokenizer.pad_token_id).sum(dim=1).max())
        input_ids = input_ids[:, :length]
        attention = (input_ids != tokenizer.pad_token_id).long()
        labels = input_ids.masked_fill(attention == 0, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=x, input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(budget.elapsed(), 1)})
            log(f"step {step} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} {budget.elapsed():.0f}s")

    model.half().save_pretrained(str(out), safe_serialization=True)
    card = {
        "name": "shapes-captioner",
        "family": "transformers BLIP (BlipForConditionalGeneration)",
        "reference": str(out),
        "purpose": "CapFilt captioner for the shapes world (tests, demo, benchmarks); not a general model",
        "parameters": n_params,
        "weights": "model.safetensors (fp16)",
        "config": {"width": width, "vision_layers": vision_layers, "text_layers": text_layers, "patch_size": 8,
                   "image_size": IMAGE_SIZE, "vocab_size": len(tokenizer), "cross_attention": "all 64 patch tokens + CLS"},
        "tokenizer": "BERT WordPiece vocab.txt of whole words (capfilt.world.captions.VOCABULARY and ','), [DEC] start token",
        "sampling": "nucleus, top_p=0.9 (capfilt.udfs.models.Captioner.generate)",
        "training": {
            "data": f"capfilt.world.corpus.make_annotated(n={n_train}, seed={seed}): clean captions, a random phrasing per step",
            "objective": "captioning language-model loss (BLIP's LM objective)",
            **budget_figures(seed, steps, budget, batch, lr, threads, bf16, data_seconds, t0, history),
        },
    }
    write_card(out, card)
    return card
