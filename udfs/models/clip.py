"""The CLIP wrapper (`ClipModel`), and the open_clip families' loading (CLIP, and CoCa's model in
coca.py) and driver check of any open_clip reference: a folder with open_clip_config.json (local, or a hub
snapshot), a weights file beside one, or a built-in architecture with a pretrained tag or a weights file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .constants import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from .device import _torch_dtype
from .errors import ModelNotAvailable
from .folders import loads, read_config, weights_in
from .hub import _download, _require_hub, _tag_weights
from .refs import Reference
from .safety import _has_weights, _refuse_pickles

# Untrusted captions are cut to this many characters per context position before tokenizing, so a
# megabyte-long caption costs no more than a long one; no token is anywhere near this long.
CHARS_PER_TOKEN_BOUND = 64


@dataclass
class ClipModel:
    """An open_clip model with its preprocessing and tokenizer. encode_* return L2-normalised
    float32 numpy rows, so a cosine is a dot product."""
    ref: str
    model: Any
    preprocess: Callable          # PIL image -> CHW float tensor
    tokenizer: Callable           # list[str] -> LongTensor (n, context_length)
    device: str
    precision: str
    context_length: int = 77

    def tokenize(self, texts: Sequence[str]):
        limit = self.context_length * CHARS_PER_TOKEN_BOUND
        return self.tokenizer(["" if t is None else str(t)[:limit] for t in texts])

    def encode_images(self, images: Sequence, batch_size: int = 256) -> np.ndarray:
        import torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
                x = x.to(self.device, dtype=_torch_dtype(self.precision))
                out.append(self.model.encode_image(x, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        import torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start:start + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        return int(proj.shape[-1]) if proj is not None and hasattr(proj, "shape") else 0


def _open_clip_dir_model(ref: Reference, folder: Path, device: str, precision: str, weights: str | None = None):
    """An open_clip model from a folder with open_clip_config.json (and weights, or `weights`)."""
    import open_clip
    if weights is None and not _has_weights(folder, OPEN_CLIP_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {OPEN_CLIP_CONFIG} but no weights file "
                                f"({', '.join(OPEN_CLIP_WEIGHTS)}); refusing to hand out a randomly initialised model")
    spec = f"local-dir:{folder}"

    def load():
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec, device=device, precision=precision, weights_only=True, load_weights=weights is None)
        if weights is not None:
            open_clip.load_checkpoint(model, weights, weights_only=True)
            model.to(device)
        return model, preprocess

    model, preprocess = _refuse_pickles(ref, load)
    return model, preprocess, open_clip.get_tokenizer(spec)


def _open_clip_named_model(ref: Reference, name: str, weights: str, cfg: dict, device: str, precision: str):
    """A built-in open_clip architecture with a weights file (local, or cached from a tag)."""
    import open_clip
    # a pretrained tag's own preprocessing (mean, std, ...), as open_clip 3.3's image_* arguments
    preprocess_cfg = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}

    def load():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=device, precision=precision, weights_only=True,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)), **preprocess_cfg)
        return model, preprocess

    model, preprocess = _refuse_pickles(ref, load)
    return model, preprocess, open_clip.get_tokenizer(name)


def _open_clip_model(ref: Reference, folder: Path | None, device: str, precision: str):
    """(model, preprocess, tokenizer) of an open_clip reference: its folder with open_clip_config.json (a
    local folder, a hub snapshot, or the folder of a local weights file), else a built-in architecture
    with a weights file or a pretrained tag; fails fast."""
    import open_clip
    if folder is not None:
        weights = ref.source if ref.kind == "local_file" else None
        return _open_clip_dir_model(ref, folder, device, precision, weights=weights)
    if ref.kind == "open_clip_file":
        return _open_clip_named_model(ref, ref.name, ref.source, {}, device, precision)
    if ref.kind == "open_clip_tag":
        cached, hub_id, cfg = _tag_weights(ref.name, ref.source)
        if cached is None:
            _require_hub(ref, hub_id)
            cached = _download(ref, hub_id, lambda: open_clip.download_pretrained(cfg))
        return _open_clip_named_model(ref, ref.name, cached, cfg, device, precision)
    raise ValueError(f"model {ref.text!r}: not an open_clip reference")


def _clip_model(ref: Reference, folder: Path | None, device: str, precision: str) -> ClipModel:
    """An open_clip CLIP (or the CLIP half of a CoCa), ready for inference: the clip family's loader."""
    model, preprocess, tokenizer = _open_clip_model(ref, folder, device, precision)
    model.eval()
    context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    return ClipModel(ref.text, model, preprocess, tokenizer, device, precision, context_length)


def open_clip_model_cfg(ref: Reference, folder: Path | None) -> dict | None:
    """The model config of an open_clip reference, after the checks the loader makes before building it:
    a local folder's open_clip_config.json must be an object with a model_cfg object, and its tokenizer must
    load; a built-in architecture's config as open_clip knows it. None for a hub snapshot (its files as the
    hub gave them: open_clip fetches what else it needs, such as a tokenizer, by name)."""
    if folder is None:
        import open_clip
        return open_clip.get_model_config(ref.name) or {}
    if ref.kind == "hub":
        return None
    config = read_config(ref, folder / OPEN_CLIP_CONFIG)
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or not all(isinstance(model_cfg.get(k, {}), dict)
                                                  for k in ("vision_cfg", "text_cfg", "multimodal_cfg")):
        raise ValueError(f"model {ref.text!r}: {folder / OPEN_CLIP_CONFIG} needs a model_cfg object (with "
                         f"vision_cfg and text_cfg objects), as open_clip writes it")
    import open_clip
    loads(ref, folder, "tokenizer (tokenizer.json, tokenizer_config.json, ...)",
          lambda: open_clip.get_tokenizer(f"local-dir:{folder}"))
    return model_cfg


def open_clip_weights(ref: Reference, folder: Path | None) -> list[str]:
    """The weights files an open_clip reference loads (empty when they would come from the hub)."""
    if ref.kind in ("local_file", "open_clip_file"):
        return [ref.source]
    if folder is None:  # a pretrained tag: cached, or the hub may be asked
        cached, hub_id, _ = _tag_weights(ref.name, ref.source)
        if cached is None:
            _require_hub(ref, hub_id)
            return []
        return [cached]
    if ref.kind != "hub" and not _has_weights(folder, OPEN_CLIP_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {OPEN_CLIP_CONFIG} but no weights file")
    return weights_in(ref, folder)
