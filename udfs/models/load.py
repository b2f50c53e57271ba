"""One loader for every model reference: `load_clip`, `load_captioner`, `load_itm`. A reference is parsed,
its family found in the registry (families.py: `find`, which the driver's check uses too) and built by that
family's loader, on CUDA in half precision when there is a GPU, on CPU in fp32 otherwise."""

from __future__ import annotations

from typing import Any

from .captioner import Captioner
from .clip import ClipModel
from .constants import DEFAULT_CAPTIONER, DEFAULT_CLIP
from .device import pick_device
from .families import find
from .itm import ItmModel
from .refs import parse_reference


def load_model(ref: str, role: str, device: str | None = None, precision: str | None = None) -> Any:
    """The model `ref` names, loaded as `role`, by the family the registry finds it to be."""
    parsed = parse_reference(ref)
    device, precision = pick_device(device, precision)
    family, folder = find(parsed, role, fetch=True)
    return family.load(parsed, folder, device, precision)


def load_clip(ref: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None) -> ClipModel:
    """An open_clip CLIP (or the CLIP half of a CoCa) from any reference, ready for inference."""
    return load_model(ref, "clip", device, precision)


def load_captioner(ref: str = DEFAULT_CAPTIONER, device: str | None = None,
                   precision: str | None = None) -> Captioner:
    """A captioner (BLIP via transformers, or CoCa via open_clip) from any reference."""
    return load_model(ref, "captioner", device, precision)


def load_itm(ref: str, device: str | None = None, precision: str | None = None) -> ItmModel:
    """A BLIP ITM model from a hub id or a local save_pretrained folder, ready for inference."""
    return load_model(ref, "itm", device, precision)
