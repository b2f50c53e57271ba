"""The image-text matching (ITM) scorer: transformers' BlipForImageTextRetrieval with its ITM head,
the filter of BLIP's CapFilt. A cross-encoder: the text layers attend to every patch of the image,
so it scores a caption against the picture rather than comparing two pooled vectors.

`ItmModel.embed` runs the vision tower once per image; `ItmModel.match` scores any number of
captions against those embeddings (a caption's row says which image), so K candidate captions of
an image cost one vision pass. The score is the match probability, softmax(itm_head(...))[1],
as BlipForImageTextRetrieval(use_itm_head=True) computes it.

The blip_itm family (families.py) loads it with `_itm_model` and checks it with `check_itm_folder`;
`load_itm` is in load.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .clip import CHARS_PER_TOKEN_BOUND
from .constants import HF_CONFIG, HF_WEIGHTS
from .device import _torch_dtype
from .errors import ModelNotAvailable
from .folders import read_config
from .refs import Reference
from .safety import _has_weights, _refuse_pickles

ITM_ARCHITECTURE = "BlipForImageTextRetrieval"


@dataclass
class ItmModel:
    ref: str
    model: Any
    preprocess: Callable    # list of PIL images -> pixel tensor (n, 3, H, W)
    tokenizer: Any
    device: str
    precision: str
    max_length: int

    def embed(self, images: Sequence, batch_size: int = 64):
        """The vision tower's patch embeddings (n, tokens, width), on the model's device."""
        import torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = self.preprocess(images[start:start + batch_size]).to(self.device, _torch_dtype(self.precision))
                out.append(self.model.vision_model(pixel_values=x)[0])
        return torch.cat(out) if out else None

    def match(self, image_embeds, rows: Sequence[int], texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Match probability of each texts[i] with the image at image_embeds[rows[i]] (float32)."""
        import torch
        limit = self.max_length * CHARS_PER_TOKEN_BOUND
        texts = ["" if t is None else str(t)[:limit] for t in texts]
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size], padding="longest", truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                index = torch.as_tensor(rows[start:start + batch_size], device=image_embeds.device)
                embeds = image_embeds.index_select(0, index)
                hidden = self.model.text_encoder(
                    input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
                    return_dict=True).last_hidden_state
                logits = self.model.itm_head(hidden[:, 0, :]).float()
                out.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score(self, images: Sequence, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Match probability of each (image, text) pair."""
        if len(images) != len(texts):
            raise ValueError("score needs one text per image")
        return self.match(self.embed(images, batch_size), list(range(len(texts))), texts)


def _itm_model(ref: Reference, folder: Path, device: str, precision: str) -> ItmModel:
    from transformers import BlipForImageTextRetrieval, BlipProcessor
    check_itm_folder(ref, folder)

    def load():
        return BlipForImageTextRetrieval.from_pretrained(
            str(folder), torch_dtype=_torch_dtype(precision), trust_remote_code=False)

    model = _refuse_pickles(ref, load).to(device).eval()
    processor = BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False)

    def preprocess(images):
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values

    max_length = min(int(processor.tokenizer.model_max_length or 512),
                     int(model.config.text_config.max_position_embeddings))
    return ItmModel(ref.text, model, preprocess, processor.tokenizer, device, precision, max_length)


def check_itm_folder(ref: Reference, folder: Path) -> None:
    """A transformers folder holding a BLIP ITM model with weights, or one line saying why not."""
    if not (folder / HF_CONFIG).is_file():
        raise ValueError(f"model {ref.text!r}: {folder} has no {HF_CONFIG}; an ITM model is a transformers "
                         f"{ITM_ARCHITECTURE} folder (as Salesforce/blip-itm-base-coco)")
    config = read_config(ref, folder / HF_CONFIG)
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"model {ref.text!r}: {folder / HF_CONFIG}: architectures must be a list of class names "
                         f"(e.g. [\"{ITM_ARCHITECTURE}\"]), not {architectures!r}")
    if config.get("model_type") != "blip" or ITM_ARCHITECTURE not in architectures:
        found = ", ".join(architectures) or config.get("model_type")
        raise ValueError(f"model {ref.text!r}: a {found} model, not a BLIP {ITM_ARCHITECTURE} (the ITM filter)")
    if not _has_weights(folder, HF_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")
