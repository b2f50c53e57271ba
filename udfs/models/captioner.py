"""The `Captioner` every captioner family builds (BLIP in blip.py, CoCa in coca.py), and its seeded
nucleus sampling. Which family a reference is, and so which builds it, is families.py's registry
(`load_captioner` is in load.py); a family hands its decoding loop to the Captioner it builds, so this
module imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .device import _torch_dtype


@dataclass
class Captioner:
    """An image captioner: family 'blip' (transformers BlipForConditionalGeneration) or 'coca'
    (open_clip CoCa). generate() samples captions with nucleus sampling, seeded per image, through the
    family's decoding loop."""
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
    # the family's decoding loop: (captioner, pixels, k, sampler, max_new_tokens) -> k captions per image
    decoding_loop: Callable | None = None

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
        if self.decoding_loop is None:
            raise ValueError(f"captioner {self.ref!r} ({self.family}) has no decoding loop: build it with "
                             f"load_captioner")
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
            texts = self.decoding_loop(self, pixels, num_captions, sampler, max_new_tokens)
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
