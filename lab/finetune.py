"""Fine-tune a captioner, an ITM filter or a CLIP on (image, caption) pairs from data (lab/pairs.py), the
first step of BLIP's bootstrapping: models fine-tuned on a small annotated set clean a web corpus, and the
cleaned corpus trains the next round (docs/capfilt.md, "Bootstrapping").

    python -m capfilt.lab finetune captioner|itm|clip --init REF --data SRC [--data SRC ...] --out DIR

REF is any reference the one loader reads as that role (a BLIP captioner or ITM folder or hub id, an open_clip
CLIP); the result is written in the form the loader reads (save_pretrained folders for BLIP, an open_clip
`local-dir` folder for CLIP) with a model_card.json recording init, data, steps and held-out figures.

Objectives, as BLIP and NegCLIP train them:
    captioner  language-model loss on one of the image's captions (the decoder starts from BLIP's [DEC])
    itm        cross-entropy over (image, caption) pairs: per image a caption that fits, a hard negative
               (a caption the data rejected for it where there is one, else a near neighbour's) and a
               near neighbour's caption; neighbours are the images nearest in the initial model's own
               image features (BLIP mines its ITM negatives by its own image-text similarity)
    clip       symmetric InfoNCE over the batch, with one extra hard negative caption per image (rejected
               or a neighbour's); repeats of a caption elsewhere in the batch are not negatives

A held-out share of the pairs (`--heldout`, drawn with the seed) is measured before and after: the
captioner's loss and exact-caption rate, the ITM's and CLIP's AUC of fitting captions over rejected ones and
over other images' captions, CLIP's R@1. Under torchrun each process trains on its own draws and the
gradients are averaged (DistributedDataParallel); only rank 0 measures and writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.lab.common import Budget, adamw, budget_figures, fp16_state_dict, scheduled_steps, seed_everything, write_card
from capfilt.lab.metrics import roc_auc
from capfilt.lab.pairs import Pairs, read_pairs

KINDS = ("captioner", "itm", "clip")
FAMILY = {"captioner": "blip", "itm": "blip_itm", "clip": "clip"}  # the families whose training is written here
MAX_TOKENS = 40  # captioner and ITM training captions (BLIP's own max_length)


# ---------------------------------------------------------------- checks before any work

def check_init(kind: str, init: str):
    """(family, folder) of --init as `kind` after the driver's check; a family whose fine-tuning is not
    written here (a CoCa as captioner, a CoCa's CLIP half) is one line."""
    from capfilt.udfs.models import check_reference
    from capfilt.udfs.models.clip import open_clip_model_cfg
    from capfilt.udfs.models.families import find
    from capfilt.udfs.models.refs import parse_reference
    check_reference(init, kind)
    parsed = parse_reference(init)
    family, folder = find(parsed, kind, fetch=True)
    takes = {"captioner": "a BLIP captioner", "itm": "a BLIP ITM", "clip": "an open_clip CLIP"}[kind]
    if family is None or family.name != FAMILY[kind]:
        raise ValueError(f"--init {init}: {family.title if family else 'not found'}; finetune {kind} takes {takes}")
    if kind == "clip" and "multimodal_cfg" in (open_clip_model_cfg(parsed, folder) or {}):
        raise ValueError(f"--init {init}: a CoCa; finetune clip takes {takes} (no text decoder)")
    return family, folder


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists: choose a new folder (a fine-tuned model never replaces another)")


# ---------------------------------------------------------------- the models' objectives

class _Objective(torch.nn.Module):
    """What one step computes, as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model


class CaptionerLoss(_Objective):
    def forward(self, pixels, input_ids, attention):
        labels = input_ids.masked_fill(attention == 0, -100)
        return self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention, labels=labels).loss


class ItmLoss(_Objective):
    def forward(self, pixels, input_ids, attention, labels):
        image_embeds = self.model.vision_model(pixel_values=pixels)[0]
        image_embeds = image_embeds.repeat(input_ids.shape[0] // pixels.shape[0], 1, 1)
        hidden = self.model.text_encoder(
            input_ids=input_ids, attention_mask=attention, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        ).last_hidden_state
        return F.cross_entropy(self.model.itm_head(hidden[:, 0, :]).float(), labels)


class ClipLoss(_Objective):
    def forward(self, pixels, tokens, mask):
        batch = pixels.shape[0]
        images = self.model.encode_image(pixels, normalize=True).float()
        texts = self.model.encode_text(tokens, normalize=True).float()
        logits = (self.model.logit_scale.exp() * images @ texts.T).masked_fill(mask, float("-inf"))
        target = torch.arange(batch, device=pixels.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch].T, target)) / 2


# ---------------------------------------------------------------- batches

def image_features(kind: str, wrapper, pairs: Pairs, batch: int = 64) -> np.ndarray:
    """L2-normalised image features of the initial model, for the nearest neighbours."""
    if kind == "clip":
        return np.concatenate([wrapper.encode_images([pairs.pil(i) for i in range(s, min(s + batch, len(pairs)))])
                               for s in range(0, len(pairs), batch)])
    out = []
    with torch.inference_mode():
        for s in range(0, len(pairs), batch):
            x = wrapper.preprocess([pairs.pil(i) for i in range(s, min(s + batch, len(pairs)))]).to(wrapper.device)
            out.append(F.normalize(wrapper.model.vision_model(pixel_values=x)[1].float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def nearest(features: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """Each row's k nearest other rows by cosine (n x k; fewer rows than k+1: all others)."""
    k = min(k, len(features) - 1)
    out = np.empty((len(features), k), dtype=np.int64)
    for s in range(0, len(features), block):
        sims = features[s:s + block] @ features.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        out[s:s + block] = np.argsort(-sims, axis=1)[:, :k]
    return out


class Draws:
    """The captions one step trains on: a fitting one, a rejected one, a neighbour's."""

    def __init__(self, pairs: Pairs, neighbours: np.ndarray, rng: np.random.Generator):
        self.pairs, self.neighbours, self.rng = pairs, neighbours, rng

    def positive(self, i: int) -> str:
        options = self.pairs.positives[i]
        return options[int(self.rng.integers(len(options)))]

    def neighbour(self, i: int) -> str:
        """A caption of one of i's nearest images that is not one of i's own (else another image's)."""
        own = set(self.pairs.positives[i])
        for j in self.rng.permutation(self.neighbours[i]):
            options = [c for c in self.pairs.positives[j] if c not in own]
            if options:
                return options[int(self.rng.integers(len(options)))]
        for _ in range(16):
            j = int(self.rng.integers(len(self.pairs)))
            options = [c for c in self.pairs.positives[j] if c not in own]
            if options:
                return options[int(self.rng.integers(len(options)))]
        return ""  # every caption in the data fits this image: an empty caption is the negative

    def hard(self, i: int) -> str:
        rejected = self.pairs.negatives[i]
        return rejected[int(self.rng.integers(len(rejected)))] if rejected else self.neighbour(i)


def known_words(pairs: Pairs, tokenizer) -> tuple[Pairs, int]:
    """The pairs with only captions the tokenizer spells without [UNK] (a pair left without one goes), and how
    many captions were dropped."""
    unk = tokenizer.unk_token_id
    dropped, keep = 0, []
    for i, captions in enumerate(pairs.positives):
        ok = [c for c, ids in zip(captions, tokenizer(captions, truncation=True, max_length=MAX_TOKENS).input_ids) if unk is None or unk not in ids]
        dropped += len(captions) - len(ok)
        pairs.positives[i] = ok
        if ok:
            keep.append(i)
    return pairs.subset(keep), dropped


def _blip_tokens(tokenizer, texts, start: int | None = None):
    tokens = tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    ids = tokens.input_ids
    if start is not None:
        ids[:, 0] = start  # [CLS] -> [DEC]: the decoder's start token
    return ids, tokens.attention_mask


class Pixels:
    """The training images as the model's preprocessing makes them: computed once and kept when they fit in
    CACHE_BYTES (a small annotated set is trained on for many epochs), else decoded per step."""
    CACHE_BYTES = 2 << 30

    def __init__(self, kind: str, wrapper, pairs: Pairs, block: int = 256):
        self.kind, self.wrapper, self.pairs = kind, wrapper, pairs
        self.cache = None
        if self._compute([0]).numel() * 4 * len(pairs) <= self.CACHE_BYTES:
            self.cache = torch.cat([self._compute(range(s, min(s + block, len(pairs))))
                                    for s in range(0, len(pairs), block)])

    def _compute(self, index) -> torch.Tensor:
        images = [self.pairs.pil(int(i)) for i in index]
        if self.kind == "clip":
            return torch.stack([self.wrapper.preprocess(im) for im in images])
        return self.wrapper.preprocess(images)

    def __getitem__(self, index) -> torch.Tensor:
        return self.cache[torch.as_tensor(np.asarray(index))] if self.cache is not None else self._compute(index)


def step_batch(kind: str, wrapper, pairs: Pairs, pixels: Pixels, draws: Draws, index: np.ndarray, device: str) -> dict:
    """The tensors of one step for the images at `index`."""
    if kind == "clip":
        pixels = pixels[index].to(device)
        positives = [draws.positive(int(i)) for i in index]
        negatives = [draws.hard(int(i)) for i in index]
        tokens = wrapper.tokenize(positives + negatives).to(device)
        own = [set(pairs.positives[int(i)]) for i in index]
        texts = positives + negatives
        mask = torch.tensor([[t in own[r] and c != r for c, t in enumerate(texts)] for r in range(len(index))])
        return {"pixels": pixels, "tokens": tokens, "mask": mask.to(device)}
    pixels = pixels[index].to(device)
    if kind == "captioner":
        ids, attention = _blip_tokens(wrapper.tokenizer, [draws.positive(int(i)) for i in index],
                                      start=wrapper.special["start"])
        return {"pixels": pixels, "input_ids": ids.to(device), "attention": attention.to(device)}
    texts = [draws.positive(int(i)) for i in index] + [draws.hard(int(i)) for i in index] + \
            [draws.neighbour(int(i)) for i in index]
    ids, attention = _blip_tokens(wrapper.tokenizer, texts)
    labels = torch.cat([torch.ones(len(index), dtype=torch.long), torch.zeros(2 * len(index), dtype=torch.long)])
    return {"pixels": pixels, "input_ids": ids.to(device), "attention": attention.to(device),
            "labels": labels.to(device)}


# ---------------------------------------------------------------- held-out figures

def _other_captions(pairs: Pairs) -> list[str]:
    """Per held-out image the first caption of the next image that is not one of its own."""
    out = []
    for i in range(len(pairs)):
        own = set(pairs.positives[i])
        out.append(next((c for k in range(1, len(pairs)) for c in pairs.positives[(i + k) % len(pairs)]
                         if c not in own), ""))
    return out


def heldout_figures(kind: str, wrapper, pairs: Pairs, seed: int) -> dict:
    """The held-out figures of a loaded model (the loader's wrapper)."""
    images = [pairs.pil(i) for i in range(len(pairs))]
    first = [p[0] for p in pairs.positives]
    other = _other_captions(pairs)
    rejected_rows = [i for i in range(len(pairs)) if pairs.negatives[i]]
    rejected = [pairs.negatives[i][0] for i in rejected_rows]
    if kind == "captioner":
        losses = []
        with torch.inference_mode():
            for s in range(0, len(pairs), 32):
                pixels = wrapper.preprocess(images[s:s + 32]).to(wrapper.device, dtype=wrapper.model.dtype)
                ids, attention = _blip_tokens(wrapper.tokenizer, first[s:s + 32], start=wrapper.special["start"])
                loss = CaptionerLoss(wrapper.model)(pixels, ids.to(wrapper.device), attention.to(wrapper.device))
                losses.append(float(loss) * len(ids))
        sampled = wrapper.generate(images, num_captions=1, top_p=0.9, seeds=[seed + i for i in range(len(images))])
        exact = [s[0].strip().lower() in {p.strip().lower() for p in pairs.positives[i]} for i, s in enumerate(sampled)]
        return {"loss": round(sum(losses) / len(pairs), 4), "exact_caption_rate": round(float(np.mean(exact)), 4)}
    if kind == "itm":
        embeds = wrapper.embed(images)
        fit = wrapper.match(embeds, list(range(len(pairs))), first)
        figures = {"auc_other_image": roc_auc(fit, wrapper.match(embeds, list(range(len(pairs))), other))}
        if rejected:
            figures["auc_rejected"] = roc_auc(fit[rejected_rows], wrapper.match(embeds, rejected_rows, rejected))
        figures["fit_accuracy"] = float((fit > 0.5).mean())
        return {k: round(v, 4) for k, v in figures.items()}
    from capfilt.lab.metrics import recall_at_1
    image_f = wrapper.encode_images(images)
    fit_f = wrapper.encode_texts(first)
    fit = (image_f * fit_f).sum(1)
    figures = {"auc_other_image": roc_auc(fit, (image_f * wrapper.encode_texts(other)).sum(1)),
               "recall_at_1": recall_at_1(image_f, fit_f, first, len(pairs))["image_to_text"]}
    if rejected:
        figures["auc_rejected"] = roc_auc(fit[rejected_rows], (image_f[rejected_rows] * wrapper.encode_texts(rejected)).sum(1))
    return {k: round(v, 4) for k, v in figures.items()}


# ---------------------------------------------------------------- writing

def _save(kind: str, model, folder: Path | None, init: str, out: Path) -> None:
    """The fine-tuned weights in the form the loader reads, beside the init's processor / config files."""
    if kind in ("captioner", "itm"):
        from transformers import BlipProcessor
        model.half().save_pretrained(str(out), safe_serialization=True)
        BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False).save_pretrained(str(out))
        return
    from safetensors.torch import save_file

    from capfilt.udfs.models.constants import OPEN_CLIP_WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    if folder is not None:  # an open_clip folder: its config and tokenizer files, new weights
        for file in folder.iterdir():
            if file.is_file() and file.name not in OPEN_CLIP_WEIGHTS and file.name != "model_card.json" \
                    and not file.name.endswith((".bin", ".pt", ".pth", ".safetensors")):
                shutil.copy2(file, out / file.name)
    else:  # a built-in architecture (NAME:TAG or NAME:FILE): its config as open_clip knows it
        import open_clip
        name = init.split(":", 1)[0]
        cfg = dict(open_clip.get_model_config(name))
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess},
                                                              indent=2) + "\n")
    save_file(fp16_state_dict(model), str(out / "open_clip_model.safetensors"))


def _load(kind: str, ref: str, device: str):
    from capfilt.udfs.models import load_captioner, load_clip, load_itm
    loader = {"captioner": load_captioner, "itm": load_itm, "clip": load_clip}[kind]
    return loader(ref, device=device, precision="fp32")


def _split(n: int, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 29]).permutation(n)
    heldout = min(heldout, n // 5) if n >= 10 else 0
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def _distributed() -> tuple[int, int, str]:
    """(rank, world size, device): the process group torchrun describes (WORLD_SIZE > 1, RANK, LOCAL_RANK),
    else one process. CAPFILT_DIST_INIT replaces torchrun's TCP rendezvous (env://) by another init method,
    e.g. file:///shared/path for processes started by hand."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if cuda else "gloo", init_method=os.environ.get("CAPFILT_DIST_INIT", "env://"),
                                rank=int(os.environ["RANK"]), world_size=world)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        return dist.get_rank(), world, f"cuda:{local}" if cuda else "cpu"
    return 0, 1, "cuda" if cuda else "cpu"


def finetune(kind: str, init: str, data: list[str], out: Path, *, steps: int, batch: int, lr: float, heldout: int,
             neighbours: int = 8, seed: int = 0, minutes: float | None = None, threads: int | None = None,
             bf16: bool | None = None, log=print) -> dict | None:
    """Fine-tune and write `out` (through a sibling `.partial` folder, renamed when whole); the card, or None
    on the ranks other than 0."""
    from capfilt.lab.common import set_threads
    started = time.perf_counter()
    out = Path(out)
    check_out(out)
    _, folder = check_init(kind, init)
    pairs = read_pairs(data)  # refuses a source without pairs, before any model is built
    rank, world, device = _distributed()
    threads = set_threads(threads)
    seed_everything(seed + rank)
    bf16 = device.startswith("cuda") if bf16 is None else bf16
    wrapper = _load(kind, init, device)
    unknown = 0
    if kind == "captioner":  # a caption outside the captioner's vocabulary would teach it to write [UNK]
        pairs, unknown = known_words(pairs, wrapper.tokenizer)
    train_index, heldout_index = _split(len(pairs), heldout, seed)
    if len(train_index) < 2:
        raise ValueError(f"--data: {len(pairs)} pairs leave fewer than 2 to train on")
    train_pairs, heldout_pairs = pairs.subset(train_index), pairs.subset(heldout_index)
    before = heldout_figures(kind, wrapper, heldout_pairs, seed) if rank == 0 and len(heldout_pairs) else None
    neighbour_index = nearest(image_features(kind, wrapper, train_pairs), neighbours) if kind != "captioner" \
        else np.zeros((len(train_pairs), 0), dtype=np.int64)
    pixels = Pixels(kind, wrapper, train_pairs)
    data_seconds = time.perf_counter() - started
    log(f"data: {len(train_pairs)} pairs to train on, {len(heldout_pairs)} held out, {data_seconds:.1f}s")

    model = wrapper.model.float().train()
    objective = {"captioner": CaptionerLoss, "itm": ItmLoss, "clip": ClipLoss}[kind](model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        objective = DistributedDataParallel(objective, device_ids=[device] if device.startswith("cuda") else None,
                                            find_unused_parameters=kind == "itm")  # the ITC projections
    batch = min(batch, len(train_pairs))
    optimizer = adamw(model, lr, 0.05)
    rng = np.random.default_rng([seed, rank, 17])
    draws = Draws(train_pairs, neighbour_index, rng)
    budget = Budget(steps, minutes)
    history = []
    for step in scheduled_steps(optimizer, steps, lr, budget, log):
        index = rng.choice(len(train_pairs), batch, replace=False)
        tensors = step_batch(kind, wrapper, train_pairs, pixels, draws, index, device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = objective(**tensors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if kind == "clip":
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(budget.elapsed(), 1)})
            log(f"step {step} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} {budget.elapsed():.0f}s")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return None
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.eval()
    _save(kind, model, folder, init, partial)
    after = heldout_figures(kind, _load(kind, str(partial), device), heldout_pairs, seed) if len(heldout_pairs) else None
    card = {
        "name": out.name,
        "reference": str(out),
        "family": {"captioner": "transformers BLIP (BlipForConditionalGeneration)",
                   "itm": "transformers BLIP (BlipForImageTextRetrieval, ITM head)", "clip": "open_clip CLIP"}[kind],
        "weights": "model.safetensors (fp16)" if kind != "clip" else "open_clip_model.safetensors (fp16)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "finetuned": {
            "kind": kind, "init": str(Path(init).resolve()) if Path(init).exists() else init,
            "data": pairs.sources, "pairs_trained_on": len(train_pairs),
            **({"captions_with_unknown_tokens": unknown} if kind == "captioner" else {}),
            "objective": {"captioner": "language-model loss on one of the image's captions",
                          "itm": "ITM cross-entropy: a fitting caption, a rejected (else neighbour's) caption and "
                                 f"a caption of one of the {neighbours} nearest images",
                          "clip": "symmetric InfoNCE + one rejected (else neighbour's) caption per image"}[kind],
            "processes": world, "device": device,
            **budget_figures(seed, steps, budget, batch, lr, threads, bf16, data_seconds, started, history),
        },
        "metrics": {"heldout": {"pairs": len(heldout_pairs), "before": before, "after": after,
                                "note": "rejected: the captions the data's own filter rejected (its judgement, "
                                        "not ground truth)"}},
    }
    if folder is not None and (folder / "model_card.json").is_file():
        card["finetuned"]["init_card"] = {k: v for k, v in json.loads((folder / "model_card.json").read_text()).items()
                                          if k in ("name", "reference", "finetuned")}
    write_card(partial, card)
    partial.rename(out)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return card
