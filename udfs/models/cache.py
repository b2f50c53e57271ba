"""The per-worker model cache: one model per (reference, device, precision) per process.

Spark reuses Python workers across tasks, so a model loads once per worker. The cache lives in this
importable module on purpose (a cache in a driver script's globals is pickled with the UDF and
reloaded on every task)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .captioner import Captioner
from .clip import ClipModel
from .constants import DEFAULT_CAPTIONER, DEFAULT_CLIP
from .device import pick_device
from .itm import ItmModel
from .load import load_captioner, load_clip, load_itm

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(kind: str, ref: str, device: str | None, precision: str | None) -> tuple:
    device, precision = pick_device(device, precision)
    path = Path(ref).expanduser()
    return kind, str(path.resolve()) if path.exists() else ref, device, precision


def cached_clip(ref: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None) -> ClipModel:
    """load_clip, once per process for each (reference, device, precision)."""
    key = _cache_key("clip", ref, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_clip(ref, key[2], key[3])
        return _CACHE[key]


def cached_captioner(ref: str = DEFAULT_CAPTIONER, device: str | None = None,
                     precision: str | None = None) -> Captioner:
    """load_captioner, once per process for each (reference, device, precision)."""
    key = _cache_key("captioner", ref, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_captioner(ref, key[2], key[3])
        return _CACHE[key]


def cached_itm(ref: str, device: str | None = None, precision: str | None = None) -> ItmModel:
    """load_itm, once per process for each (reference, device, precision)."""
    key = _cache_key("itm", ref, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_itm(ref, key[2], key[3])
        return _CACHE[key]


def worker_model(settings, cached):
    """A stage's model in this Python worker: torch threads set, loaded once through `cached`
    (cached_clip, cached_captioner) from the settings' model and device ("auto": pick_device's choice)."""
    set_torch_threads(settings.torch_threads)
    return cached(settings.model, None if settings.device == "auto" else settings.device)


def set_torch_threads(threads: int) -> None:
    """Python workers share the machine's cores: an explicit thread count beats torch's default when
    several workers run (measured: see docs/benchmarks.md). 0 leaves torch's default."""
    if threads > 0:
        import torch
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
