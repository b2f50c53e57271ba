"""Where weights come from: the local Hugging Face cache first, then the hub, failing fast.

A hub reference is looked up in the local cache; if it is not there and the hub is offline
(HF_HUB_OFFLINE) or unreachable, `ModelNotAvailable` is raised at once, naming the reference and how
to pass a local path (instead of the hub client's retries)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from .errors import ModelNotAvailable
from .refs import Reference

HUB_PROBE_TIMEOUT_S = 3.0


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


def _download_transformers_snapshot(hub_id: str) -> Path:
    """Fetch a transformers model's snapshot (a BLIP captioner or ITM model): its configuration, weights,
    tokenizer and processor files. open_clip's weights file names are among the patterns too, so the one
    download also serves an open_clip CoCa repository when a plain hub id may be either."""
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(hub_id, allow_patterns=[
        "*.json", "*.txt", "*.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]))
