"""Train the shapes-world image-text matching (ITM) filter: a tiny BLIP cross-encoder
(transformers' BlipForImageTextRetrieval, the head BLIP's CapFilt filtered with), saved with
save_pretrained next to its BlipProcessor, i.e. in the form of Salesforce/blip-itm-base-coco and
loaded by the same code.

Objective: BLIP's ITM loss, binary cross-entropy over (image, caption) pairs. Each image in a step
gets three captions: its own (clean or web phrasing, half each), a hard negative with exactly one
attribute changed (colour, shape, size, order or background, drawn evenly so that no attribute is
learnt last), and an easy negative (another image's caption, a generic or a spam alt-text).
Initialisation: the vision tower and the text layers (cross-attention included) come from the
shapes captioner, as BLIP initialises its filter and captioner from one pre-trained model; word
embeddings start fresh (the ITM's token set adds the web words).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.lab.common import Budget, adamw, budget_figures, scheduled_steps, seed_everything, set_threads, write_card
from capfilt.lab.data import ATTRIBUTES, annotated, with_attribute_changed
from capfilt.lab.tokens import save_blip_processor, web_words
from capfilt.world.captions import N_PHRASINGS, describe, web_phrasing
from capfilt.world.corpus import GENERIC_CAPTIONS, SPAM_CAPTIONS

MAX_TOKENS = 40


def itm_config(captioner_config, vocab_size: int):
    """The captioner's architecture with an ITM head; the text config is the captioner's, as an encoder."""
    from transformers import BlipConfig
    text = captioner_config.text_config.to_dict()
    text.update(vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS)
    config = BlipConfig(text_config=text, vision_config=captioner_config.vision_config.to_dict(),
                        projection_dim=captioner_config.projection_dim,
                        image_text_hidden_size=captioner_config.image_text_hidden_size)
    config.architectures = ["BlipForImageTextRetrieval"]
    return config


def init_from_captioner(model, captioner) -> list[str]:
    """Copy the captioner's vision tower and text layers into the ITM model; return what was copied."""
    source = {f"vision_model.{k}": v for k, v in captioner.vision_model.state_dict().items()}
    source |= {f"text_encoder.{k}": v for k, v in captioner.text_decoder.bert.state_dict().items()}
    target = model.state_dict()
    copied = [k for k, v in source.items() if k in target and target[k].shape == v.shape]
    model.load_state_dict({k: source[k].float() for k in copied}, strict=False)
    return copied


def caption_of(scene, style: str, rng: np.random.Generator) -> str:
    return web_phrasing(scene, rng) if style == "web" else describe(scene, int(rng.integers(N_PHRASINGS)))


def step_captions(scenes, rng: np.random.Generator, weights: dict | None = None) -> tuple[list[str], list[str], list[str]]:
    """(positives, hard negatives, easy negatives) for one batch of scenes; `weights` draws the hard
    negatives' attribute (even by default)."""
    positives, hard, easy = [], [], []
    for i, scene in enumerate(scenes):
        style = "web" if rng.random() < 0.5 else "clean"
        positives.append(caption_of(scene, style, rng))
        options = [a for a in ATTRIBUTES if a != "order" or len(scene.objects) == 2 and scene.objects[0] != scene.objects[1]]
        odds = np.array([(weights or {}).get(a, 1.0) for a in options])
        changed = with_attribute_changed(scene, options[int(rng.choice(len(options), p=odds / odds.sum()))], rng)
        hard.append(caption_of(changed, "web" if rng.random() < 0.5 else "clean", rng))
        draw = rng.random()
        if draw < 0.6:
            other = scenes[(i + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)]
            easy.append(caption_of(other, "web" if rng.random() < 0.5 else "clean", rng) if other != scene
                        else SPAM_CAPTIONS[int(rng.integers(len(SPAM_CAPTIONS)))])
        elif draw < 0.8:
            easy.append(GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))].format(n=int(rng.integers(10_000))))
        else:
            easy.append(SPAM_CAPTIONS[int(rng.integers(len(SPAM_CAPTIONS)))])
    return positives, hard, easy


def train(out: Path, seed: int = 0, steps: int = 2000, minutes: float | None = 30.0, n_train: int = 20000,
          batch: int = 64, lr: float = 5e-4, threads: int | None = None, bf16: bool = True,
          captioner: str | None = None, resume: str | None = None, weights: dict | None = None,
          log_every: int = 100, log=print) -> dict:
    """resume: an ITM folder to go on training (its card's training becomes the first phase of this
    card's); weights: the hard negatives' attribute odds, e.g. {"shape": 3} (even by default)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor

    from capfilt.udfs.models import SHAPES_CAPTIONER
    captioner = captioner or SHAPES_CAPTIONER
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    threads = set_threads(threads)
    t0 = time.perf_counter()
    source = BlipForConditionalGeneration.from_pretrained(captioner, torch_dtype=torch.float32)
    image_processor = BlipImageProcessor.from_pretrained(captioner)
    size = image_processor.size["height"]
    words, marks = web_words()
    processor = save_blip_processor(out, size, image_processor.image_mean, image_processor.image_std,
                                    extra=words + marks)
    tokenizer = processor.tokenizer
    data = annotated(n_train, seed, image_size=size)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    data_seconds = time.perf_counter() - t0
    log(f"data: {len(data)} images, {data_seconds:.1f}s")

    if resume:
        model = BlipForImageTextRetrieval.from_pretrained(resume, torch_dtype=torch.float32)
        if model.config.text_config.vocab_size != len(tokenizer):
            raise ValueError(f"{resume} has another token set ({model.config.text_config.vocab_size} tokens)")
        before = json.loads((Path(resume) / "model_card.json").read_text())["training"]
        copied = []
    else:
        model = BlipForImageTextRetrieval(itm_config(source.config, len(tokenizer)))
        copied = init_from_captioner(model, source)
        before = None
    del source
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(model, lr, 0.05)
    rng = np.random.default_rng([seed, 13])
    budget = Budget(steps, minutes)
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    model.train()
    history = []
    for step in scheduled_steps(optimizer, steps, lr, budget, log):
        idx = rng.choice(len(data), batch, replace=False)
        x = (images[torch.from_numpy(idx)].float() / 255 - mean) / std
        positives, hard, easy = step_captions([data.scenes[i] for i in idx], rng, weights)
        tokens = tokenizer(positives + hard + easy, padding="longest", truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_embeds = model.vision_model(pixel_values=x)[0].repeat(3, 1, 1)
            hidden = model.text_encoder(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long)).last_hidden_state
            logits = model.itm_head(hidden[:, 0, :])
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            accuracy = float((logits.argmax(-1) == labels).float().mean())
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 4),
                            "seconds": round(budget.elapsed(), 1)})
            log(f"step {step} loss {loss.item():.4f} acc {accuracy:.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{budget.elapsed():.0f}s")

    model.half().save_pretrained(str(out), safe_serialization=True)
    card = {
        "name": "shapes-itm",
        "family": "transformers BLIP (BlipForImageTextRetrieval, ITM head)",
        "reference": str(out),
        "purpose": "CapFilt ITM filter for the shapes world (tests, demo, benchmarks); not a general model",
        "parameters": n_params,
        "weights": "model.safetensors (fp16)",
        "score": "match probability: softmax(itm_head(text encoder [CLS], cross-attending to every patch))[1]",
        "config": {"width": model.config.text_config.hidden_size,
                   "vision_layers": model.config.vision_config.num_hidden_layers,
                   "text_layers": model.config.text_config.num_hidden_layers, "image_size": size,
                   "vocab_size": len(tokenizer)},
        "tokenizer": "BERT WordPiece vocab.txt of whole words: the clean vocabulary and the web phrasings' words",
        "training": {
            "data": f"capfilt.world.corpus.make_annotated(n={n_train}, seed={seed}); captions drawn per step, "
                    f"clean or web phrasing",
            "objective": "ITM cross-entropy; per image its caption, a one-attribute hard negative (attribute "
                         "drawn evenly from colour, shape, size, order, background) and an easy negative "
                         "(another image's caption 60%, generic 20%, spam 20%)",
            "initialised_from": resume or f"{captioner} (vision tower and text layers: {len(copied)} tensors)",
            "hard_negative_attribute_odds": weights or "even",
            **({"previous_phase": before} if before else {}),
            **budget_figures(seed, steps, budget, batch, lr, threads, bf16, data_seconds, t0, history),
        },
    }
    write_card(out, card)
    return card
