"""The model families, in one registry (`FAMILIES`): for each, the role it is loaded as, how a reference
or folder is recognised as it, its configuration and weights files, its check on the driver, its loader
and its hub download.

`find(ref, role)` says which family a parsed reference is as a role ('clip', 'captioner', 'itm'). The
loaders (load.py: load_clip, load_captioner, load_itm) and the driver's check (check.py:
check_reference) both go through it, so adding a family is one entry in FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .blip import _blip_model, check_blip_loads
from .clip import _clip_model, open_clip_model_cfg, open_clip_weights
from .coca import _coca_captioner
from .constants import HF_CONFIG, HF_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from .errors import ModelNotAvailable
from .folders import read_config, weights_in
from .hub import _cached_snapshot, _download, _download_snapshot, _download_transformers_snapshot, _require_hub
from .itm import _itm_model, check_itm_folder
from .refs import Reference
from .safety import _has_weights


@dataclass(frozen=True)
class Family:
    """One model family. A reference is of this family, as `role`, when the family `accepts` its kind and
    its folder (a local folder, the folder of a local weights file, or a hub snapshot) holds `config`; a
    reference without a folder (an open_clip NAME:TAG or NAME:FILE) is of the first family of the role
    that accepts it."""
    name: str                                                # as the loaded model names it (Captioner.family)
    role: str                                                # what it is loaded as: 'clip', 'captioner', 'itm'
    title: str                                               # what it is, in messages
    config: str                                              # the configuration file that marks its folders
    weights: tuple[str, ...]                                 # its weights files, as a hub snapshot names them
    accepts: Callable[[Reference], bool]                     # the reference kinds it can be
    check: Callable[[Reference, Path | None], list[str]]     # the driver's check (raises, one line), giving the
    #                                                          weights files to check ([]: they would come from the hub)
    load: Callable[[Reference, Path | None, str, str], Any]  # (ref, folder, device, precision) -> the model
    download: Callable[[str], Path]                          # hub id -> its snapshot folder


def _open_clip_reference(ref: Reference) -> bool:
    return True  # open_clip takes every kind: NAME:TAG, NAME:FILE, folders, a weights file, hf-hub: and hub ids


def _transformers_reference(ref: Reference) -> bool:
    return ref.kind == "local_dir" or ref.kind == "hub" and not ref.open_clip_hub


def _check_clip(ref: Reference, folder: Path | None) -> list[str]:
    open_clip_model_cfg(ref, folder)
    return open_clip_weights(ref, folder)


def _check_coca(ref: Reference, folder: Path | None) -> list[str]:
    model_cfg = open_clip_model_cfg(ref, folder)
    if model_cfg is not None and "multimodal_cfg" not in model_cfg:
        raise not_role(ref, "captioner", f"{ref.name} is a CLIP architecture" if folder is None
                       else "an open_clip model without a text decoder (a CLIP)")
    return open_clip_weights(ref, folder)


def _check_blip(ref: Reference, folder: Path) -> list[str]:
    config = read_config(ref, folder / HF_CONFIG)
    if config.get("model_type") != "blip":
        raise not_role(ref, "captioner", f"a transformers {config.get('model_type')!r} model")
    if not _has_weights(folder, HF_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")
    check_blip_loads(ref, folder)
    return weights_in(ref, folder)


def _check_itm(ref: Reference, folder: Path) -> list[str]:
    check_itm_folder(ref, folder)
    check_blip_loads(ref, folder)
    return weights_in(ref, folder)


_download_open_clip = partial(_download_snapshot, config_name=OPEN_CLIP_CONFIG, weight_names=OPEN_CLIP_WEIGHTS)

# Order matters within a role: a folder (or hub id) that more than one family of the role could be is the
# first one's (a folder with both open_clip_config.json and config.json is a CoCa), and a hub id that is in
# no cache is downloaded by the last one's `download`, so a family whose download also takes the files of
# those before it comes after them (the transformers snapshot takes open_clip's files too).
FAMILIES: list[Family] = [
    Family(name="clip", role="clip", title="an open_clip CLIP (or a CoCa, a CLIP with a text decoder)",
           config=OPEN_CLIP_CONFIG, weights=OPEN_CLIP_WEIGHTS, accepts=_open_clip_reference, check=_check_clip,
           load=_clip_model, download=_download_open_clip),
    Family(name="coca", role="captioner", title="a CoCa (open_clip)",
           config=OPEN_CLIP_CONFIG, weights=OPEN_CLIP_WEIGHTS, accepts=_open_clip_reference, check=_check_coca,
           load=_coca_captioner, download=_download_open_clip),
    Family(name="blip", role="captioner", title="a BLIP (transformers BlipForConditionalGeneration)",
           config=HF_CONFIG, weights=HF_WEIGHTS, accepts=_transformers_reference, check=_check_blip,
           load=_blip_model, download=_download_transformers_snapshot),
    Family(name="blip_itm", role="itm",
           title="a transformers BlipForImageTextRetrieval (BLIP's ITM head, as Salesforce/blip-itm-base-coco)",
           config=HF_CONFIG, weights=HF_WEIGHTS, accepts=_transformers_reference, check=_check_itm,
           load=_itm_model, download=_download_transformers_snapshot),
]

_NOUNS = {"clip": "a CLIP", "captioner": "a captioner", "itm": "an ITM model"}


def roles() -> list[str]:
    """Every role some family plays, in FAMILIES' order."""
    return list(dict.fromkeys(f.role for f in FAMILIES))


def role_is(role: str) -> str:
    """'a captioner is a CoCa (open_clip) or a BLIP (...)': the families that play `role`, for messages."""
    titles = " or ".join(f.title for f in FAMILIES if f.role == role)
    return f"{_NOUNS.get(role, f'a {role} model')} is {titles}"


def not_role(ref: Reference, role: str, what: str) -> ValueError:
    """One line: `ref` is `what`, which cannot play `role`."""
    return ValueError(f"model {ref.text!r}: {what}, not {_NOUNS.get(role, f'a {role} model')}; {role_is(role)}")


def _kind(ref: Reference) -> str:
    if ref.kind in ("open_clip_tag", "open_clip_file") or ref.open_clip_hub:
        return "an open_clip reference"
    return {"local_file": "a weights file", "local_dir": "a folder", "hub": "a hub id"}.get(ref.kind, ref.kind)


def find(ref: Reference, role: str, fetch: bool = False) -> tuple[Family | None, Path | None]:
    """(family, folder) of a parsed reference loaded as `role`: the first family of the role, in FAMILIES'
    order, that accepts the reference and whose configuration file its folder holds (folder None: an
    open_clip NAME:TAG or NAME:FILE). A hub id is looked for in the local Hugging Face cache, each family's
    snapshot in turn; when none is there the hub must answer (else ModelNotAvailable at once), and then
    `fetch` downloads it, while without `fetch` the answer is (None, None): its files would come from the
    hub. ValueError, one line, when no family of the role is the reference."""
    takers = [f for f in FAMILIES if f.role == role and f.accepts(ref)]
    if not takers:
        raise ValueError(f"model {ref.text!r}: {role_is(role)}, not {_kind(ref)}")
    folder = _folder(ref, takers, fetch)
    if folder is None and ref.kind == "hub":
        return None, None
    for family in takers:
        if folder is None or (folder / family.config).is_file():
            return family, folder
    configs = " or ".join(dict.fromkeys(f.config for f in takers))
    if ref.kind == "local_file":
        raise ValueError(f"model {ref.text!r}: a weights file needs its architecture: put it beside its {configs}, "
                         f"or write NAME:{ref.source} with an open_clip NAME")
    others = sorted({f.config for f in FAMILIES if (folder / f.config).is_file()})
    holds = f" (it holds {', '.join(others)})" if others else ""
    raise ValueError(f"model {ref.text!r}: {folder} has no {configs}{holds}; {role_is(role)}")


def _folder(ref: Reference, takers: list[Family], fetch: bool) -> Path | None:
    """The folder a reference's files are in: its own, its weights file's, or a hub id's snapshot (cached, or
    downloaded when `fetch`); None for an open_clip name, and for a hub id not cached when not `fetch`."""
    if ref.kind == "local_dir":
        return Path(ref.source)
    if ref.kind == "local_file":
        return Path(ref.source).parent
    if ref.kind != "hub":
        return None
    for config, weights in dict.fromkeys((f.config, f.weights) for f in takers):
        snapshot = _cached_snapshot(ref.source, config, weights)
        if snapshot is not None:
            return snapshot
    _require_hub(ref, ref.source)
    if not fetch:
        return None
    download = takers[-1].download
    return _download(ref, ref.source, lambda: download(ref.source))
