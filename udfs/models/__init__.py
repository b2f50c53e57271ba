"""One loader for every model reference, and the per-worker model cache.

A reference names a CLIP filter or a captioner wherever its weights live:

    ViT-B-32:laion2b_s34b_b79k          open_clip architecture + pretrained tag ("/" accepted for ":")
    coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k
    ViT-B-32:/path/to/weights.safetensors   open_clip architecture + local weights file
    hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K   open_clip model on the Hugging Face hub
    Salesforce/blip-image-captioning-large         transformers model on the hub (BLIP)
    /path/to/folder                     open_clip folder (open_clip_config.json + weights) or a
                                        transformers save_pretrained folder (config.json + weights)
    /path/to/folder/weights.safetensors a weights file beside an open_clip_config.json

`load_clip` returns a `ClipModel`, `load_captioner` a `Captioner`, `load_itm` an `ItmModel` (a BLIP
ITM model: a hub id such as Salesforce/blip-itm-base-coco, or a local folder): model, preprocessing and
tokenizer, on CUDA in half precision when there is a GPU, on CPU in fp32 otherwise.

Safety: weights load from safetensors, or with `torch.load(weights_only=True)`, and
`trust_remote_code=False`: a checkpoint never runs code. Speed of failure: a hub reference is
looked up in the local Hugging Face cache first; if it is not there and the hub is offline
(HF_HUB_OFFLINE) or unreachable, `ModelNotAvailable` is raised at once, naming the reference and
how to pass a local path (instead of the hub client's retries).

`cached_clip` / `cached_captioner` keep one model per (reference, device, precision) per process:
Spark reuses Python workers across tasks, so a model loads once per worker. The cache lives in
an importable module (capfilt.udfs.models.cache) on purpose (a cache in a driver script's globals is
pickled with the UDF and reloaded on every task).

One concern per module; this package re-exports the names callers use:

    constants.py   default references, the committed shapes-world models, config and weights file names
    errors.py      ModelNotAvailable, UnsafeCheckpoint
    refs.py        parse_reference and the Reference it returns
    hub.py         the local Hugging Face cache first, downloads, failing fast when offline or unreachable
    device.py      pick_device: device and precision
    safety.py      refusing weights files that need code to unpickle; weights_only loading; the driver's
                   check of every weights file (safetensors header, state dict)
    folders.py     a model folder's files: its JSON configuration, whether a part of it loads, its weights
    clip.py        ClipModel; building and checking every open_clip reference (the clip family)
    itm.py         ItmModel: BLIP's image-text matching head (BlipForImageTextRetrieval), built and checked
    captioner.py   Captioner and its seeded nucleus sampling
    blip.py        the BLIP family (transformers): loading and decoding
    coca.py        the CoCa family (open_clip): loading and decoding
    families.py    the registry of model families (clip, coca, blip, blip_itm): how a reference is
                   recognised as each, its files, its check and its loader; `find` says which one a
                   reference is. The loaders and the check both go through it: a new family is one entry
    load.py        load_clip, load_captioner, load_itm: a reference in, its family's model out
    check.py       check_reference: a reference checked on the driver before any work (its config,
                   tokenizer and preprocessing load, every weights file is whole)
    cache.py       the per-worker cache: cached_clip, cached_captioner, cached_itm, clear_cache, and
                   worker_model (a stage's model from its settings, torch threads set)

A name is looked up in the module that defines it: to monkeypatch a loader's helper, patch it
there (e.g. capfilt.udfs.models.hub._hub_reachable), not on this package.
"""

from __future__ import annotations

from .cache import cached_captioner, cached_clip, cached_itm, clear_cache, worker_model
from .captioner import Captioner, _NucleusSampler
from .check import check_reference
from .clip import CHARS_PER_TOKEN_BOUND, ClipModel
from .constants import (
    BLIP_CAPTIONER, BLIP_ITM, DEFAULT_CAPTIONER, DEFAULT_CLIP, HF_CONFIG, HF_WEIGHTS, MODELS_DIR, OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS, SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_CLIP_WEB, SHAPES_ITM, WEIGHT_SUFFIXES,
)
from .device import pick_device
from .errors import ModelNotAvailable, UnsafeCheckpoint
from .hub import HUB_PROBE_TIMEOUT_S
from .itm import ItmModel
from .load import load_captioner, load_clip, load_itm
from .refs import Reference, parse_reference

__all__ = [
    "BLIP_CAPTIONER", "BLIP_ITM", "CHARS_PER_TOKEN_BOUND", "DEFAULT_CAPTIONER", "DEFAULT_CLIP", "HF_CONFIG", "HF_WEIGHTS",
    "HUB_PROBE_TIMEOUT_S", "MODELS_DIR", "OPEN_CLIP_CONFIG", "OPEN_CLIP_WEIGHTS", "SHAPES_CAPTIONER",
    "SHAPES_CLIP", "SHAPES_CLIP_WEB", "SHAPES_ITM", "WEIGHT_SUFFIXES",
    "Captioner", "ClipModel", "ItmModel", "ModelNotAvailable", "Reference", "UnsafeCheckpoint",
    "cached_captioner", "cached_clip", "cached_itm", "check_reference", "clear_cache", "load_captioner",
    "load_clip", "load_itm",
    "parse_reference", "pick_device", "worker_model",
    "_NucleusSampler",  # tests drive the sampler directly
]
