"""Checking a reference on the driver before any work, without building the model.

One check for every family the loader knows (open_clip CLIP and CoCa folders and files, BLIP
captioners, BLIP ITM, cached hub snapshots): the configuration file is a JSON object of the right
family, the tokenizer and image preprocessing load from the folder (they are small: ~0.2 s), and every
weights file passes `weights_problem` (a safetensors header that parses and fills the file exactly; a
PyTorch file that is a state dict loaded with weights_only). A broken folder is one line naming the
file, not task retries in every worker."""

from __future__ import annotations

import json
from pathlib import Path

from .constants import HF_CONFIG, HF_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, WEIGHT_SUFFIXES
from .errors import ModelNotAvailable
from .hub import _cached_snapshot, _require_hub, _tag_weights
from .refs import Reference, parse_reference
from .safety import _has_weights, _refuse_pickles, weights_problem


def check_reference(ref: str, role: str) -> None:
    """Check on the driver, before any data is touched, that `ref` can be loaded as `role` ('clip',
    'captioner' or 'itm') without building the model: it parses, its files exist (or are cached, or the hub may
    be asked), it is of a family that can play the role, its configuration, tokenizer and preprocessing
    load, and every weights file is whole and needs no code to unpickle.
    Raises what the workers' loader would raise hours later: ModelNotAvailable, UnsafeCheckpoint or
    ValueError, each with one line."""
    if role not in ("clip", "captioner", "itm"):
        raise ValueError(f"unknown model role {role!r}")
    parsed = parse_reference(ref)
    for weights in (_itm_weight_files(ref) if role == "itm" else _weight_files(parsed, role)):
        check_weights(parsed, weights)


def check_weights(ref: Reference, path) -> None:
    """One weights file of `ref`: whole, and loadable without running code (else one line naming it)."""
    problem = _refuse_pickles(ref, lambda: weights_problem(path))
    if problem:
        raise ValueError(f"model {ref.text!r}: {path} {problem}")


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


def check_blip_folder(ref: Reference, folder: Path) -> dict:
    """A transformers BLIP folder: config.json a BLIP configuration, its tokenizer and image processor
    loadable as the loader loads them, and weights present. Returns config.json."""
    config = read_config(ref, folder / HF_CONFIG)
    if config.get("model_type") != "blip":
        raise ValueError(f"model {ref.text!r}: {folder / HF_CONFIG} is a transformers {config.get('model_type')!r} "
                         f"model, not a BLIP")
    if not _has_weights(folder, HF_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")
    check_blip_loads(ref, folder)
    return config


def check_blip_loads(ref: Reference, folder: Path) -> None:
    """A BLIP folder's configuration, tokenizer and image processor load as the loader loads them."""
    import transformers
    _loads(ref, folder, f"configuration ({HF_CONFIG})", lambda: transformers.AutoConfig.from_pretrained(
        str(folder), trust_remote_code=False))
    _loads(ref, folder, "tokenizer and image processor (vocab.txt, preprocessor_config.json, ...)",
           lambda: transformers.BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False))


def _check_open_clip_folder(ref: Reference, folder: Path) -> dict:
    """An open_clip folder: open_clip_config.json an object with a model_cfg object, and its tokenizer
    loadable. Returns the model config."""
    config = read_config(ref, folder / OPEN_CLIP_CONFIG)
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or not all(isinstance(model_cfg.get(k, {}), dict)
                                                  for k in ("vision_cfg", "text_cfg", "multimodal_cfg")):
        raise ValueError(f"model {ref.text!r}: {folder / OPEN_CLIP_CONFIG} needs a model_cfg object (with "
                         f"vision_cfg and text_cfg objects), as open_clip writes it")
    import open_clip
    _loads(ref, folder, "tokenizer (tokenizer.json, tokenizer_config.json, ...)",
           lambda: open_clip.get_tokenizer(f"local-dir:{folder}"))
    return model_cfg


def _loads(ref: Reference, folder: Path, what: str, load) -> None:
    try:
        load()
    except Exception as e:
        raise ValueError(f"model {ref.text!r}: the {what} does not load from {folder} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None


def _itm_weight_files(ref: str) -> list[str]:
    from .itm import check_itm_folder, itm_folder
    parsed, folder = itm_folder(ref)
    if folder is None:
        _require_hub(parsed, parsed.source)
        return []
    check_itm_folder(parsed, folder)
    check_blip_loads(parsed, folder)
    return _weights_in(parsed, folder)


def _weights_in(ref: Reference, folder: Path) -> list[str]:
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


def _weight_files(ref: Reference, role: str) -> list[str]:
    """The weights files `ref` would load (empty when they would come from the hub), after the checks
    the loader makes before reading them."""
    def not_a_captioner(what: str):
        return ValueError(f"model {ref.text!r}: {what}, not a captioner (a CoCa or a BLIP model)")

    if ref.kind in ("local_dir", "local_file"):
        folder = Path(ref.source) if ref.kind == "local_dir" else Path(ref.source).parent
        if (folder / OPEN_CLIP_CONFIG).is_file():
            model_cfg = _check_open_clip_folder(ref, folder)
            if role == "captioner" and "multimodal_cfg" not in model_cfg:
                raise not_a_captioner("an open_clip model without a text decoder (a CLIP)")
            if ref.kind == "local_file":
                return [ref.source]
            if not _has_weights(folder, OPEN_CLIP_WEIGHTS):
                raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {OPEN_CLIP_CONFIG} but no weights file")
            return _weights_in(ref, folder)
        if role == "captioner" and ref.kind == "local_dir" and (folder / HF_CONFIG).is_file():
            config = read_config(ref, folder / HF_CONFIG)
            if config.get("model_type") != "blip":
                raise not_a_captioner(f"a transformers {config.get('model_type')!r} model")
            check_blip_folder(ref, folder)
            return _weights_in(ref, folder)
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
            if config_name == HF_CONFIG:
                check_blip_folder(ref, snapshot)
            return _weights_in(ref, snapshot)
    _require_hub(ref, ref.source)
    return []
