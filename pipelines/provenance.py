"""What an output was made from, so that a rerun never passes off one run's output as another's.

A committed stage records the settings it was computed with (manifest `config`) and its source:
for download, the input spec and each input file's name, size and modification time; for the later
stages, the committed stage they read (its finish time and row count). A rerun whose settings or
source differ is told what differs instead of getting the old output back.
"""
from __future__ import annotations

import hashlib
import json

# Config sections a committed stage was computed with (seed seeds caption sampling and dedup's choices).
SETTINGS = {"download": ("download", "prefilter"), "caption": ("caption", "seed"), "filter": ("filter",),
            "decontaminate": ("decontaminate", "download.image_size", "download.resize_mode",
                              "download.resize_only_if_bigger", "download.encode_format", "download.encode_quality"),
            "heads": ("heads",), "dedup": ("dedup", "seed")}
# Download settings that change how rows are fetched, not what a good row is: a committed download
# stays valid under other values, and --retry-failed may change them (e.g. a longer timeout).
# Model-stage settings that change where and how fast a model runs, not what it computes.
RUNTIME_ONLY = frozenset({"torch_threads", "gpus_per_task", "batch_size", "fuse_filter"})
FETCH_ONLY = frozenset({"timeout", "retries", "threads", "processes", "max_shard_retry", "subjob_size",
                        "retry_backoff_s", "max_retry_after_s", "max_retry_after_answers",
                        "max_retry_after_total_s", "max_requests_per_second_per_host",
                        "max_connections_per_host", "polite_to_allowed_hosts",
                        "rows_per_shard", "allow_hosts", "loopback_only"})


def input_source(spec) -> dict:
    """The input of a download, identified without reading it: the spec (path, format, columns) and a
    digest of each input file's name, size and modification time."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(spec.path)
    if any(c in root for c in "*?["):
        names = fs.glob(root)
    else:
        names = fs.find(root) if fs.isdir(root) else [root]
    files = []
    for name in sorted(names):
        try:
            info = fs.info(name)
        except FileNotFoundError:  # a missing input has no files (the reader refuses it, with one line)
            continue
        if info.get("type") == "file":
            files.append([name, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    return {"spec": dict(spec.__dict__), "files": len(files), "bytes": sum(f[1] or 0 for f in files),
            "digest": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def source_of(manifest: dict) -> dict:
    """The committed stage output a later stage read: any rerun of that stage makes a new one."""
    return {"finished_at": manifest.get("finished_at"), "rows": manifest.get("counts", {}).get("output")}


def changed_keys(used: dict, config: dict, keys, skip=()) -> list[str]:
    """The dotted keys (a section or section.key) whose value differs between two config dicts. A key
    the run that used `used` did not record was added to capfilt after it ran: left at its default
    it does not make that run's output stale (after an upgrade, a committed download is not thrown
    away for `download.reduced_decode`); set to anything else, it does."""
    from capfilt.pipelines.config import Config
    defaults = Config().to_dict()
    changed = []
    for key in keys:
        now, default = _get(config, key), _get(defaults, key)
        before = _get(used, key) if _has(used, key) else default
        if isinstance(before, dict) and isinstance(now, dict):
            default = default if isinstance(default, dict) else {}
            changed += [f"{key}.{k}" for k in sorted(set(before) | set(now)) if k not in skip
                        and before.get(k, default.get(k)) != now.get(k)]
        elif before != now:
            changed.append(key)
    return changed


def _has(config: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def stale_reason(manifest: dict, config: dict, stage: str, source: dict | None = None) -> str | None:
    """Why a committed stage (its manifest) does not belong to a run with `config` and `source`:
    'other settings (key, ...)' or 'another input'; None when it does."""
    changed = changed_keys(manifest.get("config", {}), config, SETTINGS[stage],
                           FETCH_ONLY if stage == "download" else RUNTIME_ONLY)
    if changed:
        return f"other settings ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"
    recorded = manifest.get("source")
    if source is not None and recorded is not None and recorded != source:
        return "another input"
    return None
