"""The `Captioner` both families share, its seeded nucleus sampling, and `load_captioner`, which
picks the family (BLIP in blip.py, CoCa in coca.py) a reference names. The family modules build a
Captioner, so this one imports them where they are needed, not at the top."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .constants import DEFAULT_CAPTIONER, HF_CONFIG, HF_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from .device import _torch_dtype, pick_device
from .hub import _cached_snapshot, _download, _download_hub_captioner, _require_hub
from .refs import Reference, parse_reference


@dataclass
class Captioner:
    """An image captioner: family 'blip' (transformers BlipForConditionalGeneration) or 'coca'
    (open_clip CoCa). generate() samples captions with nucleus sampling, seeded per image."""
    ref: str
    family: str
    model: Any
    preprocess: Callable          # list of PIL images -> NCHW float tensor
    tokenizer: Any
    device: str
    precision: str
    decode: Callable[[list[int]], str]  # token ids -> text, special tokens dropped
    special: dict                 # start / end / pad token ids
    processor: Any = None         # BlipProcessor for the blip family

    def generate(self, images: Sequence, num_captions: int = 1, top_p: float = 0.9,
                 seeds: Sequence[int] | None = None, max_new_tokens: int = 40,
                 temperature: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0,
                 repetition_penalty: float = 1.0) -> list[list[str]]:
        """num_captions captions per image, sampled with nucleus sampling (top_p), each image's
        draws coming from its own seed (default: its position), so a caption depends on its image
        and seed only, not on what else is in the batch. min_new_tokens holds back the end token
        until that many tokens are out; repetition_penalty > 1 makes tokens already in the caption
        less likely (CTRL's rule, as transformers applies it)."""
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens {min_new_tokens} > max_new_tokens {max_new_tokens}")
        seeds = list(range(len(images))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        out: list[list[str]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = self.preprocess(list(chunk)).to(self.device, dtype=_torch_dtype(self.precision))
            streams = [np.random.default_rng([s & 0xFFFFFFFF, j]) for s in seeds[start:start + batch_size]
                       for j in range(num_captions)]
            sampler = _NucleusSampler(streams, top_p, temperature, end=self.special["end"],
                                      min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
            texts = _decoder(self.family)(self, pixels, num_captions, sampler, max_new_tokens)
            out += [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(chunk))]
        return out


class _NucleusSampler:
    """Nucleus (top-p) sampling with one random stream per row: a row's tokens depend on its own
    stream only, so sampling is reproducible per image whatever the batch holds."""

    def __init__(self, streams, top_p: float, temperature: float, end: int | None = None,
                 min_new_tokens: int = 0, repetition_penalty: float = 1.0):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.streams, self.top_p, self.temperature = streams, top_p, max(temperature, 1e-6)
        self.end, self.min_new_tokens, self.repetition_penalty = end, min_new_tokens, repetition_penalty

    def __call__(self, logits, rows=None, generated=None):
        """Token ids (1-D LongTensor) for the given rows (all by default) of logits; generated
        holds those rows' tokens so far, the start token first."""
        import torch
        rows = range(len(self.streams)) if rows is None else rows
        if generated is not None:
            logits = logits.clone()
            if self.repetition_penalty != 1.0:
                seen = logits.gather(1, generated)
                seen = torch.where(seen > 0, seen / self.repetition_penalty, seen * self.repetition_penalty)
                logits.scatter_(1, generated, seen)
            if self.end is not None and generated.shape[1] - 1 < self.min_new_tokens:
                logits[:, self.end] = float("-inf")
        u = torch.tensor([self.streams[r].random() for r in rows], dtype=torch.float64)
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        # The nucleus of a trained model is a few tokens: the top _TOP_K, sorted, hold it unless a row's
        # top _TOP_K fall short of top_p (a flat distribution; certain when _TOP_K times its largest
        # probability does), and such rows are sorted whole. Either way the pick is the one a full sort
        # gives, computed on the CPU so that a seed gives the same caption on any device; only the top
        # _TOP_K leave the GPU. A vocabulary of at most _TOP_K tokens is always sorted whole.
        tokens = torch.empty(len(probs), dtype=torch.long)
        whole = torch.ones(len(probs), dtype=torch.bool)
        if _TOP_K < probs.shape[-1]:
            near = (probs.amax(dim=-1) * _TOP_K >= self.top_p).cpu().nonzero().squeeze(-1)
            if len(near):
                top, order = (t.cpu() for t in _rows(probs, near).topk(_TOP_K, dim=-1))
                tokens[near] = _nucleus_pick(top, order, u[near], self.top_p)
                whole[near] = (top.cumsum(dim=-1)[:, -1] - top[:, -1]) < self.top_p
        rest = whole.nonzero().squeeze(-1)
        if len(rest):
            sorted_probs, order = _rows(probs, rest).cpu().sort(dim=-1, descending=True)
            tokens[rest] = _nucleus_pick(sorted_probs, order, u[rest], self.top_p)
        return tokens.to(logits.device)


_TOP_K = 256


def _rows(values, rows):
    """values[rows], without the copy when rows are all of them (a copy of 320 x 49,408 doubles costs
    a tenth of a sampling step)."""
    return values if len(rows) == len(values) else values[rows.to(values.device)]


def _nucleus_pick(sorted_probs, order, u, top_p: float):
    """Token ids: rows of probabilities sorted in descending order (with their token ids in order),
    each row's draw u in [0, 1) -> the token of the nucleus (the smallest prefix reaching top_p) at u."""
    import torch
    cumulative = sorted_probs.cumsum(dim=-1)
    keep = (cumulative - sorted_probs) < top_p
    kept = sorted_probs * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    pick = (kept.cumsum(dim=-1) < u[:, None]).sum(dim=-1).clamp(max=kept.shape[-1] - 1)
    pick = torch.minimum(pick, keep.sum(dim=-1) - 1)  # rounding never leaves the nucleus
    return order.gather(-1, pick[:, None]).squeeze(-1)


def _decoder(family: str) -> Callable:
    """The decoding loop of a family: (captioner, pixels, k, sampler, max_new_tokens) -> k captions
    per image."""
    from .blip import _blip_decode
    from .coca import _coca_decode
    return {"blip": _blip_decode, "coca": _coca_decode}[family]


def load_captioner(ref: str = DEFAULT_CAPTIONER, device: str | None = None,
                   precision: str | None = None) -> Captioner:
    """A captioner (BLIP via transformers, or CoCa via open_clip) from any reference."""
    from .blip import _blip_model
    from .coca import _coca_captioner
    parsed = parse_reference(ref)
    device, precision = pick_device(device, precision)
    if parsed.kind == "local_dir":
        folder = Path(parsed.source)
        if (folder / HF_CONFIG).is_file() and not (folder / OPEN_CLIP_CONFIG).is_file():
            return _blip_model(parsed, folder, device, precision)
        return _coca_captioner(parsed, device, precision)
    if parsed.kind == "hub" and not parsed.open_clip_hub:
        if _cached_snapshot(parsed.source, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS) is not None:
            return _coca_captioner(parsed, device, precision)
        snapshot = _cached_snapshot(parsed.source, HF_CONFIG, HF_WEIGHTS)
        if snapshot is None:
            _require_hub(parsed, parsed.source)
            snapshot = _download(parsed, parsed.source, lambda: _download_hub_captioner(parsed.source))
            if (snapshot / OPEN_CLIP_CONFIG).is_file():
                return _coca_captioner(Reference(parsed.text, "local_dir", source=str(snapshot)), device, precision)
        return _blip_model(parsed, snapshot, device, precision)
    return _coca_captioner(parsed, device, precision)
