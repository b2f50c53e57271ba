"""Synthetic captions for a batch of images, free of Spark: the captioner UDF's body.

Each row's sampling is seeded from (global seed, uid), so a rerun, a retried task or another batch
size gives the same captions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionParams:
    num_captions: int = 5
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    batch_size: int = 32
    seed: int = 0


def row_seed(uid: str, seed: int) -> int:
    """A 32-bit seed for one row, stable across runs and machines (not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{uid}".encode(), digest_size=4).digest(), "little")


def caption_batch(captioner, images: list, uids: list[str], params: CaptionParams) -> list[list[str] | None]:
    """K captions per image; None where the image is None (it could not be decoded)."""
    rows = [i for i, image in enumerate(images) if image is not None]
    out: list[list[str] | None] = [None] * len(images)
    if rows:
        captions = captioner.generate([images[i] for i in rows], num_captions=params.num_captions,
                                      top_p=params.top_p, seeds=[row_seed(uids[i], params.seed) for i in rows],
                                      max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                      batch_size=params.batch_size, min_new_tokens=params.min_new_tokens,
                                      repetition_penalty=params.repetition_penalty)
        for i, texts in zip(rows, captions):
            out[i] = texts
    return out
