"""Heads: small models over the stored CLIP image embedding (the filter stage's `image_embedding`),
saved as a folder with head.safetensors (float32 state dict) and card.json (docs/models.md).

    linear: keys weight [1, D], bias [1]
    mlp:    an nn.Sequential `layers` of Linear, activation, ..., Linear (last out = 1):
            keys layers.0.weight, layers.0.bias, layers.2.weight, ...
score = sigmoid(head(embedding)); a row is flagged when score > threshold (direction "above").
The embedding is read as the pipeline stores it: float16 little-endian bytes, cast to float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = "head.safetensors"
CARD = "card.json"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPHead(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_head(architecture: str, input_dim: int, hidden: list[int] | None = None, activation: str = "relu") -> nn.Module:
    """An untrained head: nn.Linear(input_dim, 1) for "linear", MLPHead for "mlp"."""
    if architecture == "linear":
        return nn.Linear(input_dim, 1)
    if architecture == "mlp":
        if not hidden:
            raise ValueError("an mlp head needs hidden layer widths")
        return MLPHead(input_dim, list(hidden), activation)
    raise ValueError(f"architecture must be linear or mlp, not {architecture!r}")


def save_head(folder: str | Path, head: nn.Module, card: dict) -> None:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")


def load_head(folder: str | Path) -> tuple[nn.Module, dict]:
    """(head in eval mode, card) of a head folder; the state dict must match the card exactly."""
    from safetensors.torch import load_file
    folder = Path(folder)
    card = json.loads((folder / CARD).read_text())
    head = build_head(card["architecture"], card["input_dim"], card.get("hidden"), card.get("activation", "relu"))
    head.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return head.eval(), card


def head_scores(head: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """sigmoid(head(embedding)) per row, float32."""
    with torch.inference_mode():
        logits = head(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))
    return torch.sigmoid(logits[:, 0]).numpy()
