"""Safe loading: weights load from safetensors, or with `torch.load(weights_only=True)`, and
`trust_remote_code=False`; a checkpoint never runs code. A pickle that needs code becomes
`UnsafeCheckpoint`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

from .constants import WEIGHT_SUFFIXES
from .errors import UnsafeCheckpoint
from .refs import Reference


def _unpickling_error(error: BaseException | None) -> BaseException | None:
    """The UnpicklingError behind an error, if any (transformers wraps it in OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, pickle.UnpicklingError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _refuse_pickles(ref: Reference, load: Callable[[], Any]):
    """Run a load; a weights file that is a pickle with code in it becomes UnsafeCheckpoint."""
    try:
        return load()
    except Exception as e:
        refused = _unpickling_error(e)
        if refused is None:
            raise
        raise UnsafeCheckpoint(
            f"model {ref.text!r}: refused to load a weights file that needs code to unpickle "
            f"(torch.load(weights_only=True) said: {str(refused).splitlines()[0]}). Convert it to safetensors "
            f"on a machine where you trust its origin.") from e


def _has_weights(folder: Path, names: Sequence[str]) -> bool:
    return any((folder / n).is_file() for n in names) or any(
        p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def _load_tensors_only(path: str) -> None:
    import torch
    try:  # mmap: the tensors are mapped, not read; the unpickler still checks every object
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
