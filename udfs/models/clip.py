"""The CLIP wrapper (`ClipModel`), building any open_clip reference, and `load_clip`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .constants import DEFAULT_CLIP, HF_CONFIG, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from .device import _torch_dtype, pick_device
from .errors import ModelNotAvailable
from .hub import _cached_snapshot, _download, _download_snapshot, _require_hub, _tag_weights
from .refs import Reference, parse_reference
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


def _open_clip_model(ref: Reference, device: str, precision: str):
    """(model, preprocess, tokenizer) of an open_clip reference of any kind; fails fast."""
    import open_clip
    if ref.kind == "local_dir":
        folder = Path(ref.source)
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            other = " (it is a transformers folder)" if (folder / HF_CONFIG).is_file() else ""
            raise ValueError(f"model {ref.text!r}: {folder} has no {OPEN_CLIP_CONFIG}{other}; an open_clip folder "
                             f"holds {OPEN_CLIP_CONFIG} and weights")
        return _open_clip_dir_model(ref, folder, device, precision)
    if ref.kind == "local_file":
        folder = Path(ref.source).parent
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise ValueError(f"model {ref.text!r}: a weights file needs its architecture: put it beside an "
                             f"{OPEN_CLIP_CONFIG}, or write NAME:{ref.source} with an open_clip NAME")
        return _open_clip_dir_model(ref, folder, device, precision, weights=ref.source)
    if ref.kind == "open_clip_file":
        return _open_clip_named_model(ref, ref.name, ref.source, {}, device, precision)
    if ref.kind == "open_clip_tag":
        cached, hub_id, cfg = _tag_weights(ref.name, ref.source)
        if cached is None:
            _require_hub(ref, hub_id)
            cached = _download(ref, hub_id, lambda: open_clip.download_pretrained(cfg))
        return _open_clip_named_model(ref, ref.name, cached, cfg, device, precision)
    if ref.kind == "hub":
        snapshot = _cached_snapshot(ref.source, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
        if snapshot is None:
            _require_hub(ref, ref.source)
            snapshot = _download(ref, ref.source, lambda: _download_snapshot(ref.source, OPEN_CLIP_CONFIG,
                                                                             OPEN_CLIP_WEIGHTS))
        return _open_clip_dir_model(ref, snapshot, device, precision)
    raise ValueError(f"model {ref.text!r}: not an open_clip reference")


def load_clip(ref: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None) -> ClipModel:
    """An open_clip CLIP (or the CLIP half of a CoCa) from any reference, ready for inference."""
    parsed = parse_reference(ref)
    device, precision = pick_device(device, precision)
    model, preprocess, tokenizer = _open_clip_model(parsed, device, precision)
    model.eval()
    context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    return ClipModel(ref, model, preprocess, tokenizer, device, precision, context_length)
