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

`load_clip` returns a `ClipModel`, `load_captioner` a `Captioner`: model, preprocessing and
tokenizer, on CUDA in half precision when there is a GPU, on CPU in fp32 otherwise.

Safety: weights load from safetensors, or with `torch.load(weights_only=True)`, and
`trust_remote_code=False`: a checkpoint never runs code. Speed of failure: a hub reference is
looked up in the local Hugging Face cache first; if it is not there and the hub is offline
(HF_HUB_OFFLINE) or unreachable, `ModelNotAvailable` is raised at once, naming the reference and
how to pass a local path (instead of the hub client's retries).

`cached_clip` / `cached_captioner` keep one model per (reference, device, precision) per process:
Spark reuses Python workers across tasks, so a model loads once per worker. The cache lives in
this importable module on purpose (a cache in a driver script's globals is pickled with the UDF
and reloaded on every task).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np

DEFAULT_CLIP = "ViT-B-32:laion2b_s34b_b79k"
DEFAULT_CAPTIONER = "coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k"
BLIP_CAPTIONER = "Salesforce/blip-image-captioning-large"

# The small models trained on the shapes world (lab/), committed in the repository.
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SHAPES_CLIP = str(MODELS_DIR / "shapes-clip")
SHAPES_CAPTIONER = str(MODELS_DIR / "shapes-captioner")

OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_PROBE_TIMEOUT_S = 3.0
# Untrusted captions are cut to this many characters per context position before tokenizing, so a
# megabyte-long caption costs no more than a long one; no token is anywhere near this long.
CHARS_PER_TOKEN_BOUND = 64


class ModelNotAvailable(RuntimeError):
    """The weights of a reference cannot be had here (not on disk, not cached, hub unreachable)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint that could only be loaded by running code from it (a pickle payload)."""


# --- references -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """A parsed model reference. kind: 'open_clip_tag' (name + pretrained tag), 'open_clip_file'
    (name + local weights file), 'local_dir', 'local_file', 'hub' (hub id; family found later)."""
    text: str
    kind: str
    name: str | None = None    # open_clip architecture
    source: str = ""           # tag, path or hub id
    open_clip_hub: bool = False  # given with the hf-hub: prefix: an open_clip repository


def _open_clip_names() -> set[str]:
    import open_clip
    return set(open_clip.list_models())


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or text.endswith(WEIGHT_SUFFIXES)
            or os.sep in text and Path(text).parent.exists() and not _looks_like_hub_id(text))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and all(
        c.isalnum() or c in "-_." for part in parts for c in part)


def parse_reference(ref: str) -> Reference:
    """Parse a reference (see the module docstring). A path that exists wins over every other
    reading, as in transformers' from_pretrained."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"a model reference must be a non-empty string, got {ref!r}")
    text = ref.strip()
    if text.startswith("hf-hub:"):
        hub_id = text[len("hf-hub:"):]
        if not _looks_like_hub_id(hub_id):
            raise ValueError(f"{ref!r}: expected hf-hub:ORG/NAME")
        return Reference(ref, "hub", source=hub_id, open_clip_hub=True)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
        if not Path(text).expanduser().is_dir():
            raise ModelNotAvailable(f"model {ref!r}: no such folder {text!r}")
    path = Path(text).expanduser()
    if path.exists():
        return Reference(ref, "local_dir" if path.is_dir() else "local_file", source=str(path.resolve()))
    for sep in (":", "/"):
        name, found, rest = text.partition(sep)
        if found and name in _open_clip_names():
            return _open_clip_reference(ref, name, rest)
    if text in _open_clip_names():
        raise ValueError(f"{ref!r} names an open_clip architecture but no weights: add a pretrained tag "
                         f"({_tags_hint(text)}) or a local weights file, e.g. '{text}:/path/to/weights.safetensors'")
    if _looks_like_path(text):
        raise ModelNotAvailable(f"model {ref!r}: no such file or folder {str(path)!r}")
    if _looks_like_hub_id(text):
        return Reference(ref, "hub", source=text)
    raise ValueError(f"{ref!r} is not a model reference: expected an open_clip NAME:TAG, hf-hub:ORG/NAME, "
                     f"a hub id ORG/NAME, or a local file or folder")


def _tags_hint(name: str) -> str:
    import open_clip
    tags = open_clip.list_pretrained_tags_by_model(name)
    return "one of " + ", ".join(tags) if tags else "it has no known tags"


def _open_clip_reference(ref: str, name: str, rest: str) -> Reference:
    import open_clip
    if not rest:
        raise ValueError(f"{ref!r}: the pretrained tag or weights path after {name!r} is missing ({_tags_hint(name)})")
    if rest in open_clip.list_pretrained_tags_by_model(name):
        return Reference(ref, "open_clip_tag", name=name, source=rest)
    path = Path(rest).expanduser()
    if path.is_file():
        return Reference(ref, "open_clip_file", name=name, source=str(path.resolve()))
    if _looks_like_path(rest) or path.is_dir():
        raise ModelNotAvailable(f"model {ref!r}: no weights file {rest!r}")
    raise ValueError(f"{ref!r}: {rest!r} is neither a pretrained tag of {name} ({_tags_hint(name)}) nor a file")


# --- where weights come from: local cache first, then fail fast -------------------------------

def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _how_to_pass_local(ref: Reference, hub_id: str | None) -> str:
    download = (f"Download it where the hub is reachable (e.g. `huggingface-cli download {hub_id} --local-dir DIR`) "
                if hub_id else "Download the weights where the network is reachable ")
    example = (f"'{ref.name}:/path/to/weights.safetensors' or " if ref.name else "")
    return (f"{download}and pass the local path as the model reference instead of {ref.text!r}: "
            f"{example}a folder with open_clip_config.json + weights, or a transformers save_pretrained folder "
            f"(config.json + weights)")


def _unavailable(ref: Reference, hub_id: str | None, why: str) -> ModelNotAvailable:
    return ModelNotAvailable(f"model {ref.text!r} is not available: {why}. {_how_to_pass_local(ref, hub_id)}.")


def _require_hub(ref: Reference, hub_id: str | None) -> None:
    """Return if a download may be tried; raise ModelNotAvailable at once otherwise."""
    from huggingface_hub import constants
    where = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE})" if hub_id else "not cached locally"
    if ref.kind == "hub" and not ref.open_clip_hub:
        where = f"no local folder {ref.text!r} exists, and it is {where}"
    if _hub_offline():
        raise _unavailable(ref, hub_id, f"{where} and the hub is offline (HF_HUB_OFFLINE is set)")
    if not _hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise _unavailable(ref, hub_id, f"{where} and {endpoint} cannot be reached")


def _cached(hub_id: str, filenames: Sequence[str]) -> str | None:
    """Path of the first of filenames in the local hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return found
    return None


def _cached_snapshot(hub_id: str, config_name: str, weight_names: Sequence[str]) -> Path | None:
    """The cached snapshot folder of hub_id if both its config and weights are cached."""
    config = _cached(hub_id, [config_name])
    if config is None or _cached(hub_id, weight_names) is None:
        return None
    return Path(config).parent


def _tag_weights(name: str, tag: str) -> tuple[str | None, str | None, dict]:
    """(cached weights file or None, hub id or None, pretrained cfg) of an open_clip tag."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("hf_hub"):
        # open_clip's convention: 'org/repo/' means the default file, 'org/repo/file.pt' names one
        hub_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        return _cached(hub_id, [*_get_safe_alternatives(filename), filename]), hub_id, cfg
    url = cfg.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return (str(target) if url and target.is_file() else None), None, cfg


# --- device and precision ---------------------------------------------------------------------

def pick_device(device: str | None = None, precision: str | None = None) -> tuple[str, str]:
    """(device, precision): CUDA in fp16 when present, else CPU in fp32, unless told otherwise."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision is None:
        precision = "fp16" if str(device).startswith("cuda") else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return str(device), precision


def _torch_dtype(precision: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --- safe loading -------------------------------------------------------------------------------

def _unpickling_error(error: BaseException | None) -> BaseException | None:
    """The UnpicklingError behind an error, if any (transformers wraps it in OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, pickle.UnpicklingError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _refuse_pickles(ref: Reference, load: Callable[[], Any]):
    """Run a load; a weights file that is a pickle with code in it becomes UnsafeCheckpoint."""
    try:
        return load()
    except Exception as e:
        refused = _unpickling_error(e)
        if refused is None:
            raise
        raise UnsafeCheckpoint(
            f"model {ref.text!r}: refused to load a weights file that needs code to unpickle "
            f"(torch.load(weights_only=True) said: {str(refused).splitlines()[0]}). Convert it to safetensors "
            f"on a machine where you trust its origin.") from e


def _has_weights(folder: Path, names: Sequence[str]) -> bool:
    return any((folder / n).is_file() for n in names) or any(
        p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


# --- CLIP ---------------------------------------------------------------------------------------

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


def _download(ref: Reference, hub_id: str | None, fetch: Callable[[], Any]):
    try:
        return fetch()
    except Exception as e:  # the hub answered, but not with the weights
        raise _unavailable(ref, hub_id, f"download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _download_snapshot(hub_id: str, config_name: str, weight_names: Sequence[str]) -> Path:
    from huggingface_hub import hf_hub_download
    config = hf_hub_download(hub_id, config_name)
    for name in weight_names:
        try:
            hf_hub_download(hub_id, name)
            break
        except Exception:
            continue
    else:
        raise FileNotFoundError(f"none of {list(weight_names)} in {hub_id}")
    return Path(config).parent


def load_clip(ref: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None) -> ClipModel:
    """An open_clip CLIP (or the CLIP half of a CoCa) from any reference, ready for inference."""
    parsed = parse_reference(ref)
    device, precision = pick_device(device, precision)
    model, preprocess, tokenizer = _open_clip_model(parsed, device, precision)
    model.eval()
    context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    return ClipModel(ref, model, preprocess, tokenizer, device, precision, context_length)


# --- captioners ---------------------------------------------------------------------------------

@dataclass
class Captioner:
    """An image captioner: family 'blip' (transformers BlipForConditionalGeneration) or 'coca'
    (open_clip CoCa). generate() samples captions with nucleus sampling, seeded per image."""
    ref: str
    family: str
    model: Any
    preprocess: Callable          # list of PIL images -> NCHW float tensor
    tokenizer: Any
    device: str
    precision: str
    decode: Callable[[list[int]], str]  # token ids -> text, special tokens dropped
    special: dict                 # start / end / pad token ids
    processor: Any = None         # BlipProcessor for the blip family

    def generate(self, images: Sequence, num_captions: int = 1, top_p: float = 0.9,
                 seeds: Sequence[int] | None = None, max_new_tokens: int = 40,
                 temperature: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0,
                 repetition_penalty: float = 1.0) -> list[list[str]]:
        """num_captions captions per image, sampled with nucleus sampling (top_p), each image's
        draws coming from its own seed (default: its position), so a caption depends on its image
        and seed only, not on what else is in the batch. min_new_tokens holds back the end token
        until that many tokens are out; repetition_penalty > 1 makes tokens already in the caption
        less likely (CTRL's rule, as transformers applies it)."""
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens {min_new_tokens} > max_new_tokens {max_new_tokens}")
        seeds = list(range(len(images))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        out: list[list[str]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = self.preprocess(list(chunk)).to(self.device, dtype=_torch_dtype(self.precision))
            streams = [np.random.default_rng([s & 0xFFFFFFFF, j]) for s in seeds[start:start + batch_size]
                       for j in range(num_captions)]
            sampler = _NucleusSampler(streams, top_p, temperature, end=self.special["end"],
                                      min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
            texts = _DECODERS[self.family](self, pixels, num_captions, sampler, max_new_tokens)
            out += [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(chunk))]
        return out


class _NucleusSampler:
    """Nucleus (top-p) sampling with one random stream per row: a row's tokens depend on its own
    stream only, so sampling is reproducible per image whatever the batch holds."""

    def __init__(self, streams, top_p: float, temperature: float, end: int | None = None,
                 min_new_tokens: int = 0, repetition_penalty: float = 1.0):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.streams, self.top_p, self.temperature = streams, top_p, max(temperature, 1e-6)
        self.end, self.min_new_tokens, self.repetition_penalty = end, min_new_tokens, repetition_penalty

    def __call__(self, logits, rows=None, generated=None):
        """Token ids (1-D LongTensor) for the given rows (all by default) of logits; generated
        holds those rows' tokens so far, the start token first."""
        import torch
        rows = range(len(self.streams)) if rows is None else rows
        if generated is not None:
            logits = logits.clone()
            if self.repetition_penalty != 1.0:
                seen = logits.gather(1, generated)
                seen = torch.where(seen > 0, seen / self.repetition_penalty, seen * self.repetition_penalty)
                logits.scatter_(1, generated, seen)
            if self.end is not None and generated.shape[1] - 1 < self.min_new_tokens:
                logits[:, self.end] = float("-inf")
        u = torch.tensor([self.streams[r].random() for r in rows], dtype=torch.float64)
        probs = torch.softmax(logits.double() / self.temperature, dim=-1).cpu()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        keep = (cumulative - sorted_probs) < self.top_p  # the smallest prefix reaching top_p
        kept = sorted_probs * keep
        kept = kept / kept.sum(dim=-1, keepdim=True)
        pick = (kept.cumsum(dim=-1) < u[:, None]).sum(dim=-1).clamp(max=kept.shape[-1] - 1)
        pick = torch.minimum(pick, keep.sum(dim=-1) - 1)  # rounding never leaves the nucleus
        return order.gather(-1, pick[:, None]).squeeze(-1).to(logits.device)


class _ChosenTokenProcessor:
    """A transformers logits processor that samples with _NucleusSampler and leaves only the
    chosen token: greedy decoding then emits exactly the sampled sequence."""

    def __init__(self, sampler: _NucleusSampler):
        self.sampler = sampler

    def __call__(self, input_ids, scores):
        import torch
        chosen = self.sampler(scores, generated=input_ids)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def _blip_decode(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int) -> list[str]:
    import torch
    from transformers import LogitsProcessorList
    model = captioner.model
    with torch.inference_mode():
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        image_embeds = image_embeds.repeat_interleave(k, dim=0)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        start = torch.full((image_embeds.shape[0], 1), captioner.special["start"], dtype=torch.long,
                           device=image_embeds.device)
        # What BlipForConditionalGeneration.generate does, with the image encoded once for k captions.
        max_new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - 1)
        ids = model.text_decoder.generate(
            input_ids=start, eos_token_id=captioner.special["end"], pad_token_id=captioner.special["pad"],
            encoder_hidden_states=image_embeds, encoder_attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([_ChosenTokenProcessor(sampler)]))
    return [t.strip() for t in captioner.processor.batch_decode(ids, skip_special_tokens=True)]


def _coca_decode(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int) -> list[str]:
    """CoCa's top-p loop (open_clip's CoCa.generate) with per-row streams."""
    import torch
    model = captioner.model
    sot, eot, pad = captioner.special["start"], captioner.special["end"], captioner.special["pad"]
    with torch.inference_mode():
        latent, embs = model._encode_image(pixels)
        latent, embs = latent.repeat_interleave(k, dim=0), embs.repeat_interleave(k, dim=0)
        images = pixels.repeat_interleave(k, dim=0)
        out = torch.full((images.shape[0], 1), sot, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(max_new_tokens):
            logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            token = torch.full_like(done, pad, dtype=torch.long)
            live = (~done).nonzero().squeeze(-1)
            token[live] = sampler(logits[live], live.tolist(), out[live])
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == eot
            if done.all():
                break
    texts = []
    for row in out.tolist():
        row = row[1:]
        row = row[:row.index(eot)] if eot in row else row
        texts.append(captioner.decode([t for t in row if t != pad]).strip())
    return texts


_DECODERS = {"blip": _blip_decode, "coca": _coca_decode}


def _blip_model(ref: Reference, folder: Path, device: str, precision: str):
    from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    if config.model_type != "blip":
        raise ValueError(f"model {ref.text!r}: a transformers {config.model_type!r} model; the captioner "
                         f"families are BLIP (transformers) and CoCa (open_clip)")
    if not _has_weights(folder, HF_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")

    def load():
        return BlipForConditionalGeneration.from_pretrained(
            str(folder), torch_dtype=_torch_dtype(precision), trust_remote_code=False)

    model = _refuse_pickles(ref, load).to(device)
    # The slow (PIL) image processor, as saved with the Salesforce BLIP checkpoints.
    processor = BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False)
    text = model.config.text_config
    special = {"start": text.bos_token_id, "end": text.sep_token_id, "pad": text.pad_token_id}

    def preprocess(images):
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values

    def decode(ids):
        return processor.decode(ids, skip_special_tokens=True)

    return Captioner(ref.text, "blip", model.eval(), preprocess, processor.tokenizer, device, precision,
                     decode, special, processor=processor)


def _coca_captioner(ref: Reference, device: str, precision: str) -> Captioner:
    import torch
    model, preprocess, tokenizer = _open_clip_model(ref, device, precision)
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"model {ref.text!r}: an open_clip model without a text decoder (a CLIP, not a CoCa); "
                         f"it cannot caption")
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
    if inner is not None:
        special = {"start": inner.bos_token_id if inner.bos_token_id is not None else inner.cls_token_id,
                   "end": inner.eos_token_id if inner.eos_token_id is not None else inner.sep_token_id,
                   "pad": inner.pad_token_id or 0}
        decode = lambda ids: inner.decode(ids, skip_special_tokens=True)  # noqa: E731
    else:
        import open_clip
        special = {"start": tokenizer.sot_token_id, "end": tokenizer.eot_token_id, "pad": 0}
        decode = lambda ids: open_clip.decode(torch.tensor(ids)).replace("<start_of_text>", "").strip()  # noqa: E731

    def batch_preprocess(images):
        return torch.stack([preprocess(im) for im in images])

    return Captioner(ref.text, "coca", model.eval(), batch_preprocess, tokenizer, device, precision, decode, special)


def load_captioner(ref: str = DEFAULT_CAPTIONER, device: str | None = None,
                   precision: str | None = None) -> Captioner:
    """A captioner (BLIP via transformers, or CoCa via open_clip) from any reference."""
    parsed = parse_reference(ref)
    device, precision = pick_device(device, precision)
    if parsed.kind == "local_dir":
        folder = Path(parsed.source)
        if (folder / HF_CONFIG).is_file() and not (folder / OPEN_CLIP_CONFIG).is_file():
            return _blip_model(parsed, folder, device, precision)
        return _coca_captioner(parsed, device, precision)
    if parsed.kind == "hub" and not parsed.open_clip_hub:
        if _cached_snapshot(parsed.source, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS) is not None:
            return _coca_captioner(parsed, device, precision)
        snapshot = _cached_snapshot(parsed.source, HF_CONFIG, HF_WEIGHTS)
        if snapshot is None:
            _require_hub(parsed, parsed.source)
            snapshot = _download(parsed, parsed.source, lambda: _download_hub_captioner(parsed.source))
            if (snapshot / OPEN_CLIP_CONFIG).is_file():
                return _coca_captioner(Reference(parsed.text, "local_dir", source=str(snapshot)), device, precision)
        return _blip_model(parsed, snapshot, device, precision)
    return _coca_captioner(parsed, device, precision)


def _download_hub_captioner(hub_id: str) -> Path:
    """Fetch a hub captioner: an open_clip CoCa repository or a transformers one."""
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(hub_id, allow_patterns=[
        "*.json", "*.txt", "*.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]))


# --- checking a reference before any work ---------------------------------------------------------

def check_reference(ref: str, role: str) -> None:
    """Check on the driver, before any data is touched, that `ref` can be loaded as `role` ('clip' or
    'captioner') without building the model: it parses, its files exist (or are cached, or the hub may
    be asked), it is of a family that can play the role, and no weights file needs code to unpickle.
    Raises what the workers' loader would raise hours later: ModelNotAvailable, UnsafeCheckpoint or
    ValueError, each with one line."""
    if role not in ("clip", "captioner"):
        raise ValueError(f"unknown model role {role!r}")
    parsed = parse_reference(ref)
    for weights in _weight_files(parsed, role):
        if not weights.endswith(".safetensors"):
            _refuse_pickles(parsed, lambda: _load_tensors_only(weights))


def _load_tensors_only(path: str) -> None:
    import torch
    try:  # mmap: the tensors are mapped, not read; the unpickler still checks every object
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file


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


# --- per-worker cache ---------------------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(kind: str, ref: str, device: str | None, precision: str | None) -> tuple:
    device, precision = pick_device(device, precision)
    path = Path(ref).expanduser()
    return kind, str(path.resolve()) if path.exists() else ref, device, precision


def cached_clip(ref: str = DEFAULT_CLIP, device: str | None = None, precision: str | None = None) -> ClipModel:
    """load_clip, once per process for each (reference, device, precision)."""
    key = _cache_key("clip", ref, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_clip(ref, key[2], key[3])
        return _CACHE[key]


def cached_captioner(ref: str = DEFAULT_CAPTIONER, device: str | None = None,
                     precision: str | None = None) -> Captioner:
    """load_captioner, once per process for each (reference, device, precision)."""
    key = _cache_key("captioner", ref, device, precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_captioner(ref, key[2], key[3])
        return _CACHE[key]


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
