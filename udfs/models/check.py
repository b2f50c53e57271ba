"""Checking a reference on the driver before any work, without building the model."""

from __future__ import annotations

import json
from pathlib import Path

from .constants import HF_CONFIG, HF_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, WEIGHT_SUFFIXES
from .errors import ModelNotAvailable
from .hub import _cached_snapshot, _require_hub, _tag_weights
from .refs import Reference, parse_reference
from .safety import _has_weights, _load_tensors_only, _refuse_pickles


def check_reference(ref: str, role: str) -> None:
    """Check on the driver, before any data is touched, that `ref` can be loaded as `role` ('clip',
    'captioner' or 'itm') without building the model: it parses, its files exist (or are cached, or the hub may
    be asked), it is of a family that can play the role, and no weights file needs code to unpickle.
    Raises what the workers' loader would raise hours later: ModelNotAvailable, UnsafeCheckpoint or
    ValueError, each with one line."""
    if role not in ("clip", "captioner", "itm"):
        raise ValueError(f"unknown model role {role!r}")
    parsed = parse_reference(ref)
    for weights in (_itm_weight_files(ref) if role == "itm" else _weight_files(parsed, role)):
        if not weights.endswith(".safetensors"):
            _refuse_pickles(parsed, lambda: _load_tensors_only(weights))


def _itm_weight_files(ref: str) -> list[str]:
    from .itm import check_itm_folder, itm_folder
    parsed, folder = itm_folder(ref)
    if folder is None:
        _require_hub(parsed, parsed.source)
        return []
    check_itm_folder(parsed, folder)
    return _weights_in(folder)


def _weights_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _weight_files(ref: Reference, role: str) -> list[str]:
    """The weights files `ref` would load (empty when they would come from the hub), after the checks
    the loader makes before reading them."""
    def not_a_captioner(what: str):
        return ValueError(f"model {ref.text!r}: {what}, not a captioner (a CoCa or a BLIP model)")

    if ref.kind in ("local_dir", "local_file"):
        folder = Path(ref.source) if ref.kind == "local_dir" else Path(ref.source).parent
        if (folder / OPEN_CLIP_CONFIG).is_file():
            config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
            if role == "captioner" and "multimodal_cfg" not in config.get("model_cfg", config):
                raise not_a_captioner("an open_clip model without a text decoder (a CLIP)")
            if ref.kind == "local_file":
                return [ref.source]
            if not _has_weights(folder, OPEN_CLIP_WEIGHTS):
                raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {OPEN_CLIP_CONFIG} but no weights file")
            return _weights_in(folder)
        if role == "captioner" and ref.kind == "local_dir" and (folder / HF_CONFIG).is_file():
            model_type = json.loads((folder / HF_CONFIG).read_text()).get("model_type")
            if model_type != "blip":
                raise not_a_captioner(f"a transformers {model_type!r} model")
            if not _has_weights(folder, HF_WEIGHTS):
                raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")
            return _weights_in(folder)
        wanted = OPEN_CLIP_CONFIG if role == "clip" else f"{OPEN_CLIP_CONFIG} (CoCa) or {HF_CONFIG} (BLIP)"
        raise ValueError(f"model {ref.text!r}: {folder} has no {wanted}")
    if ref.kind in ("open_clip_file", "open_clip_tag"):
        import open_clip
        if role == "captioner" and "multimodal_cfg" not in (open_clip.get_model_config(ref.name) or {}):
            raise not_a_captioner(f"{ref.name} is a CLIP architecture")
        if ref.kind == "open_clip_file":
            return [ref.source]
        cached, hub_id, _ = _tag_weights(ref.name, ref.source)
        if cached is None:
            _require_hub(ref, hub_id)
            return []
        return [cached]
    families = [(OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)]
    if role == "captioner" and not ref.open_clip_hub:
        families.append((HF_CONFIG, HF_WEIGHTS))
    for config_name, weight_names in families:
        snapshot = _cached_snapshot(ref.source, config_name, weight_names)
        if snapshot is not None:
            return _weights_in(snapshot)
    _require_hub(ref, ref.source)
    return []
