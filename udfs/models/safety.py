"""Safe loading: weights load from safetensors, or with `torch.load(weights_only=True)`, and
`trust_remote_code=False`; a checkpoint never runs code. A pickle that needs code becomes
`UnsafeCheckpoint`. `weights_problem`: what makes a weights file unloadable (truncated, not
safetensors, no state dict), found on the driver for every family and for heads."""

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


def _load_tensors_only(path: str):
    import torch
    try:  # mmap: the tensors are mapped, not read; the unpickler still checks every object
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file


# The checks every weights file gets on the driver, whichever family loads it (CLIP, CoCa, BLIP, ITM,
# heads): a truncated download or a corrupt file is one line there, not task retries in every worker.

# safetensors dtypes and their bytes per element (sub-byte types are left unsized)
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def weights_problem(path) -> str | None:
    """What makes a weights file unloadable, in words that follow its name ("is truncated: ..."), or None.
    Read without building a model: a safetensors header (`safetensors_problem`), or a PyTorch file loaded
    with weights_only and memory-mapped (`read_state_dict`). A pickle that needs code raises
    pickle.UnpicklingError, for the caller to refuse as unsafe."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a weights file"
    if not path.is_file():
        return "does not exist"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    try:
        read_state_dict(path)
    except ValueError as e:
        return str(e)
    return None


def safetensors_problem(path) -> str | None:
    """None when the safetensors header parses and its tensors, at their dtypes and shapes, fill the file
    exactly (as the safetensors library requires when it loads); else what is wrong."""
    import json
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"is not a safetensors file ({size} bytes, shorter than its 8-byte header length)"
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            return (f"is not a safetensors file, or is truncated: its header length says {n} bytes, the file "
                    f"holds {size}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "is not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "is not a safetensors file: its header is not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)):
            return f"is not a safetensors file: tensor {name!r} has no valid dtype, shape and data_offsets"
        width = _SAFETENSORS_BYTES.get(info.get("dtype"))
        count = 1
        for d in shape:
            count *= d
        if width is not None and count * width != offsets[1] - offsets[0]:
            return (f"is corrupt: tensor {name!r} ({info['dtype']} {shape}) needs {count * width} bytes, its "
                    f"offsets span {offsets[1] - offsets[0]}")
        spans.append(offsets)
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            return "is corrupt: its tensors overlap or leave gaps"
        end = stop
    data = size - 8 - n
    if end > data:
        return f"is truncated: its header describes {end} bytes of tensors, the file holds {data}"
    if end < data:
        return f"is corrupt: {data - end} bytes follow its last tensor"
    return None


def read_state_dict(path) -> dict:
    """A PyTorch checkpoint's state dict {name: tensor} (a {"state_dict": ...} wrapper unwrapped), loaded
    with weights_only and memory-mapped. pickle.UnpicklingError for a pickle that needs code; ValueError,
    in words that follow the file's name, for a file that is no such checkpoint."""
    import torch
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):
        raise ValueError("is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        state = _load_tensors_only(path)
    except pickle.UnpicklingError:
        raise
    except Exception as e:
        raise ValueError(f"is not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"holds {_kind(state)}, not a state dict (parameter names -> tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"is not a state dict of tensors: its entry {key!r} is {_kind(value)}")
    return state


def _kind(value) -> str:
    if isinstance(value, dict):
        return "an empty dict" if not value else "a dict"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
