"""A model folder's files, read without building the model: its JSON configuration (an object, else one
line naming the file), whether a part of it (tokenizer, image processor) loads, and the weights files it
holds. The families' checks (families.py) are made of these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .constants import HF_WEIGHTS, WEIGHT_SUFFIXES
from .refs import Reference


def json_object(path: Path, who: str) -> dict:
    """A JSON file that must hold an object (a config, a card); else one line: '<who>: <path> ...'."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{who}: {path} must hold a JSON object, not a {type(value).__name__}")
    return value


def read_config(ref: Reference, path: Path) -> dict:
    """A model folder's JSON configuration file, which must hold an object."""
    return json_object(path, f"model {ref.text!r}")


def loads(ref: Reference, folder: Path, what: str, load: Callable[[], Any]) -> None:
    """Run `load` (a tokenizer, a processor, a configuration from `folder`); any failure is one line."""
    try:
        load()
    except Exception as e:
        raise ValueError(f"model {ref.text!r}: the {what} does not load from {folder} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None


def weights_in(ref: Reference, folder: Path) -> list[str]:
    """Every weights file in a folder, and every file a sharded checkpoint's index names."""
    found = {str(p) for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")}
    for index in (n for n in HF_WEIGHTS if n.endswith(".index.json")):
        if (folder / index).is_file():
            shards = read_config(ref, folder / index)
            if not isinstance(shards.get("weight_map"), dict):
                raise ValueError(f"model {ref.text!r}: {folder / index} has no weight_map object")
            named = {folder / str(name) for name in shards["weight_map"].values()}
            # a hub snapshot may still fetch a shard it lacks; a local folder has what it has
            found |= {str(p) for p in named if ref.kind != "hub" or p.exists()}
    return sorted(found)
