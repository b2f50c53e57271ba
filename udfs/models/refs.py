"""Parsing a model reference (the spellings are listed in the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .constants import WEIGHT_SUFFIXES
from .errors import ModelNotAvailable


@dataclass(frozen=True)
class Reference:
    """A parsed model reference. kind: 'open_clip_tag' (name + pretrained tag), 'open_clip_file'
    (name + local weights file), 'local_dir', 'local_file', 'hub' (hub id; family found later)."""
    text: str
    kind: str
    name: str | None = None    # open_clip architecture
    source: str = ""           # tag, path or hub id
    open_clip_hub: bool = False  # given with the hf-hub: prefix: an open_clip repository


def _open_clip_names() -> set[str]:
    import open_clip
    return set(open_clip.list_models())


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or text.endswith(WEIGHT_SUFFIXES)
            or os.sep in text and Path(text).parent.exists() and not _looks_like_hub_id(text))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and all(
        c.isalnum() or c in "-_." for part in parts for c in part)


def parse_reference(ref: str) -> Reference:
    """Parse a reference (see the capfilt.udfs.models docstring). A path that exists wins over every other
    reading, as in transformers' from_pretrained."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"a model reference must be a non-empty string, got {ref!r}")
    text = ref.strip()
    if text.startswith("hf-hub:"):
        hub_id = text[len("hf-hub:"):]
        if not _looks_like_hub_id(hub_id):
            raise ValueError(f"{ref!r}: expected hf-hub:ORG/NAME")
        return Reference(ref, "hub", source=hub_id, open_clip_hub=True)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
        if not Path(text).expanduser().is_dir():
            raise ModelNotAvailable(f"model {ref!r}: no such folder {text!r}")
    path = Path(text).expanduser()
    if path.exists():
        return Reference(ref, "local_dir" if path.is_dir() else "local_file", source=str(path.resolve()))
    for sep in (":", "/"):
        name, found, rest = text.partition(sep)
        if found and name in _open_clip_names():
            return _open_clip_reference(ref, name, rest)
    if text in _open_clip_names():
        raise ValueError(f"{ref!r} names an open_clip architecture but no weights: add a pretrained tag "
                         f"({_tags_hint(text)}) or a local weights file, e.g. '{text}:/path/to/weights.safetensors'")
    if _looks_like_path(text):
        raise ModelNotAvailable(f"model {ref!r}: no such file or folder {str(path)!r}")
    if _looks_like_hub_id(text):
        return Reference(ref, "hub", source=text)
    raise ValueError(f"{ref!r} is not a model reference: expected an open_clip NAME:TAG, hf-hub:ORG/NAME, "
                     f"a hub id ORG/NAME, or a local file or folder")


def _tags_hint(name: str) -> str:
    import open_clip
    tags = open_clip.list_pretrained_tags_by_model(name)
    return "one of " + ", ".join(tags) if tags else "it has no known tags"


def _open_clip_reference(ref: str, name: str, rest: str) -> Reference:
    import open_clip
    if not rest:
        raise ValueError(f"{ref!r}: the pretrained tag or weights path after {name!r} is missing ({_tags_hint(name)})")
    if rest in open_clip.list_pretrained_tags_by_model(name):
        return Reference(ref, "open_clip_tag", name=name, source=rest)
    path = Path(rest).expanduser()
    if path.is_file():
        return Reference(ref, "open_clip_file", name=name, source=str(path.resolve()))
    if _looks_like_path(rest) or path.is_dir():
        raise ModelNotAvailable(f"model {ref!r}: no weights file {rest!r}")
    raise ValueError(f"{ref!r}: {rest!r} is neither a pretrained tag of {name} ({_tags_hint(name)}) nor a file")
