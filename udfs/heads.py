"""Embedding heads: small linear or MLP models over the stored CLIP image embedding.

A head is a folder with its weights (`head.safetensors`, or a PyTorch state dict `*.pth`/`*.pt`
loaded with weights_only: no code runs) and `card.json`:

    name             the reject reason and the key of its score
    architecture     linear | mlp | laion_aesthetic
    input_dim        embedding size it expects
    hidden, activation   (mlp) widths of the hidden layers, relu | gelu | none
    output           sigmoid | identity: the score is the head's output passed through it
    threshold, direction   a row is flagged when score > threshold (above) or < threshold (below)
    embedding_model  {"reference": the CLIP it was trained on, "sha256": of that CLIP's weights file}

Architectures and their state-dict keys:
- linear: `weight` [1, D], `bias` [1] (LAION-5B's ViT-B/32 and ViT-L/14 linear aesthetic/watermark heads);
- mlp: `layers.<i>.weight/bias` of Linear, activation, ..., Linear;
- laion_aesthetic: LAION's improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor):
  Linear(D,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1),
  no activations: keys layers.0, .2, .4, .6, .7.

Scores are computed in numpy (float64 accumulation) from the float16 embeddings the filter stored:
no image is decoded and no CLIP runs again.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHITECTURES = ("linear", "mlp", "laion_aesthetic")
_ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "none": lambda x: x,
                "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))}
_AESTHETIC_LINEARS = (0, 2, 4, 6, 7)


class HeadError(ValueError):
    """A head that cannot be used: a missing or malformed card or weights, or another embedding model."""


def _erf(x):
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(x)


@dataclass(frozen=True)
class Head:
    name: str
    architecture: str
    layers: tuple            # ((weight [out, in] float64, bias [out] float64), ...) applied in order
    activation: str          # between linear layers (none for linear and laion_aesthetic)
    output: str
    threshold: float
    direction: str
    card: dict

    @property
    def input_dim(self) -> int:
        return self.layers[0][0].shape[1]

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """One score per row of embeddings [n, input_dim]."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise HeadError(f"head {self.name} takes {self.input_dim}-d embeddings, got shape {x.shape}")
        act = _ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = act(x)
        x = x[:, 0]
        return 1.0 / (1.0 + np.exp(-x)) if self.output == "sigmoid" else x

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold if self.direction == "above" else scores < self.threshold


def _weights(folder: Path) -> dict:
    """{key: float64 array} of the head's one weights file, checked as every model's weights are
    (udfs/models/safety.py: whole, no code to unpickle, a state dict of tensors) and finite."""
    import pickle

    from capfilt.udfs.models.safety import read_state_dict, safetensors_problem
    files = sorted(folder.glob("*.safetensors")) or sorted([*folder.glob("*.pth"), *folder.glob("*.pt")])
    if not files:
        raise HeadError(f"head {folder}: no head.safetensors (or .pth state dict) in the folder")
    if len(files) > 1:
        raise HeadError(f"head {folder}: several weight files ({', '.join(f.name for f in files)}): keep one")
    path = files[0]
    if not path.is_file():
        raise HeadError(f"head {folder}: {path.name} is {'a folder' if path.is_dir() else 'a broken link'}, not a "
                        f"weights file")
    try:
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem:
                raise ValueError(problem)
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = read_state_dict(path)
    except pickle.UnpicklingError as e:
        raise HeadError(f"head {folder}: refused {path.name}: it needs code to unpickle (torch.load("
                        f"weights_only=True) said: {str(e).splitlines()[0]}). Convert it to safetensors") from None
    except ValueError as e:
        raise HeadError(f"head {folder}: {path.name} {e}") from None
    out = {}
    for key, tensor in state.items():
        values = tensor.detach().to("cpu").double().numpy()
        if not np.isfinite(values).all():
            raise HeadError(f"head {folder}: {path.name}: {key} holds non-finite values (NaN or infinity); a head "
                            f"with them scores nothing")
        out[key] = values
    return out


def _linear_keys(architecture: str, card: dict, state: dict) -> list[str]:
    if architecture == "linear":
        return [""]
    if architecture == "laion_aesthetic":
        return [f"layers.{i}." for i in _AESTHETIC_LINEARS]
    n = len(card.get("hidden", [])) + 1
    return [f"layers.{2 * i}." for i in range(n)]


def _card(path, folder: Path) -> dict:
    """card.json, each field of the type it must have (one line naming the field otherwise)."""
    try:
        card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise HeadError(f"head {path}: no card.json (it names the architecture, the embedding model, the "
                        f"threshold and its direction)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HeadError(f"head {path}: card.json is not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise HeadError(f"head {path}: card.json must hold an object, not a {type(card).__name__}")
    missing = [k for k in ("name", "architecture", "threshold", "direction", "embedding_model") if k not in card]
    if missing:
        raise HeadError(f"head {path}: card.json lacks {', '.join(missing)}")

    def wrong(key: str, want: str):
        return HeadError(f"head {path}: card.json {key} must be {want}, not {card[key]!r}")
    for key in ("name", "architecture", "direction", "output", "activation"):
        if key in card and not isinstance(card[key], str):
            raise wrong(key, "a string")
    threshold = card["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise wrong("threshold", "a finite number")
    if "input_dim" in card and (type(card["input_dim"]) is not int or card["input_dim"] < 1):
        raise wrong("input_dim", "a positive integer")
    if "hidden" in card and not (isinstance(card["hidden"], list)
                                 and all(type(n) is int and n > 0 for n in card["hidden"])):
        raise wrong("hidden", "a list of positive integers (the hidden layers' widths)")
    model = card["embedding_model"]
    if not (isinstance(model, str) and model or isinstance(model, dict) and isinstance(model.get("reference", ""), str)
            and isinstance(model.get("sha256", ""), str) and (model.get("reference") or model.get("sha256"))):
        raise wrong("embedding_model", 'a reference, or {"reference": ..., "sha256": ...} (strings)')
    return card


def load_head(path: str | Path) -> Head:
    """The head in folder `path`, checked: its card, and finite weights of exactly its architecture's shape."""
    folder = Path(path)
    if not folder.is_dir():
        raise HeadError(f"head {path}: not a folder (a head is a folder with head.safetensors and card.json)")
    card = _card(path, folder)
    arch, direction = card["architecture"], card["direction"]
    output = card.get("output", "sigmoid" if arch != "laion_aesthetic" else "identity")
    activation = card.get("activation", "relu") if arch == "mlp" else "none"
    name = card["name"]
    for key, value, allowed in (("architecture", arch, ARCHITECTURES), ("direction", direction, ("above", "below")),
                                ("output", output, ("sigmoid", "identity")), ("activation", activation, tuple(_ACTIVATIONS))):
        if value not in allowed:
            raise HeadError(f"head {path}: card.json {key} {value!r} is not one of {', '.join(allowed)}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise HeadError(f"head {path}: name {name!r} must be letters, digits, - or _ (it becomes a reason code)")
    state = _weights(folder)
    layers, expected = [], set()
    for prefix in _linear_keys(arch, card, state):
        w, b = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
        expected |= {f"{prefix}weight", f"{prefix}bias"}
        if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
            raise HeadError(f"head {path}: the weights do not match architecture {arch} (need {prefix}weight "
                            f"[out, in] and {prefix}bias [out]; the file has {', '.join(sorted(state)) or 'nothing'})")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise HeadError(f"head {path}: layer {prefix}weight takes {w.shape[1]} inputs, the layer before gives "
                            f"{layers[-1][0].shape[0]}")
        layers.append((w, b))
    extra = set(state) - expected
    if extra or layers[-1][0].shape[0] != 1:
        raise HeadError(f"head {path}: the weights do not match architecture {arch}"
                        + (f" (unexpected {', '.join(sorted(extra)[:4])})" if extra else " (the last layer must give 1 output)"))
    if "input_dim" in card and card["input_dim"] != layers[0][0].shape[1]:
        raise HeadError(f"head {path}: the card says input_dim {card['input_dim']}, the weights take "
                        f"{layers[0][0].shape[1]}")
    if arch == "mlp" and [w.shape[0] for w, _ in layers[:-1]] != list(card.get("hidden", [])):
        raise HeadError(f"head {path}: the card's hidden {card.get('hidden')} does not match the weights")
    return Head(name=name, architecture=arch, layers=tuple(layers), activation=activation, output=output,
                threshold=float(card["threshold"]), direction=direction,
                card=card)


def weights_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_embedding_model(head: Head, clip_reference: str) -> None:
    """Refuse a head trained on another CLIP's embeddings: the card's reference must be the run's, or
    the run's CLIP must be a local folder whose weights file has the card's sha256."""
    wanted = head.card["embedding_model"]
    wanted = wanted if isinstance(wanted, dict) else {"reference": str(wanted)}
    ref, sha = str(wanted.get("reference", "")), wanted.get("sha256")
    if sha:
        folder = Path(clip_reference)
        files = [f for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if f.is_file()] \
            if folder.is_dir() else ([folder] if folder.is_file() else [])
        if any(weights_sha256(f) == sha for f in files):
            return
    if ref and same_reference(ref, clip_reference) and not (sha and Path(clip_reference).exists()):
        return
    raise HeadError(f"head {head.name} was trained on embeddings of {ref or '?'}"
                    + (f" (weights sha256 {sha[:12]}...)" if sha else "")
                    + f"; this run's CLIP is {clip_reference}: its scores would mean nothing. Use the head made "
                      f"for this CLIP, or set filter.model to the head's")


def same_reference(a: str, b: str) -> bool:
    def norm(r: str) -> str:
        p = Path(r)
        return str(p.resolve()) if p.exists() else r.strip().rstrip("/").lower()
    return norm(a) == norm(b)


def embeddings_from_bytes(values) -> np.ndarray:
    """The stored float16 little-endian embeddings of a batch -> float32 [n, D] (None -> NaN row)."""
    values = list(values)
    dim = next((len(v) // 2 for v in values if v is not None), 0)
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None and len(v) == 2 * dim:
            out[i] = np.frombuffer(v, dtype="<f2")
    return out
