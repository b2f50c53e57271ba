"""What an output was made from, so that a rerun never passes off one run's output as another's.

A committed stage records the settings it was computed with (manifest `config`) and its source:
for download, the input spec and each input file's name, size and modification time; for the later
stages, the committed stage they read (its finish time and row count). A rerun whose settings or
source differ is told what differs instead of getting the old output back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# Download settings that change how rows are fetched, not what a good row is: a committed download
# stays valid under other values, and --retry-failed may change them (e.g. a longer timeout).
FETCH_ONLY = frozenset({"timeout", "retries", "threads", "processes", "max_shard_retry", "subjob_size",
                        "retry_backoff_s", "max_retry_after_s", "max_retry_after_answers",
                        "max_retry_after_total_s", "max_requests_per_second_per_host",
                        "max_connections_per_host", "polite_to_allowed_hosts",
                        "rows_per_shard", "allow_hosts", "loopback_only"})

RUN, REUSE, RESELECT, REFUSE = "run", "reuse", "recompute without a model", "refuse"


@dataclass(frozen=True)
class Decision:
    """What a run does with a stage's committed output: RUN it (all of it), REUSE it as it is, RESELECT
    (recompute from what its expensive work kept: no model loaded, nothing fetched again), or REFUSE
    (it was made with settings or input this run cannot reconcile without --overwrite). `why`: what
    differs, in words."""
    action: str
    why: str = ""
    changed: tuple[str, ...] = ()


def decide(stage, manifest: dict | None, config: dict, source: dict | None = None, *, overwrite: bool = False,
           upstream_ran: bool = False, previous: str | None = None, owns_chain: bool = False,
           work_done: bool = False, inputs: dict | None = None) -> Decision:
    """The one decision on a committed stage output, pure: (stage, its manifest or None, this run's
    config dict and source) -> Decision. `source`: what this run's stage reads (the input files for the
    first stage, the committed stage before it otherwise); `previous`: the stage before it in this run's
    chain; `owns_chain` (capfilt curate): a stage before it committed again makes it RUN rather than be
    refused; `upstream_ran`: a stage before it runs in this run; `work_done`: its expensive work was
    already done upstream with this run's settings (a fused model pass); `inputs`: {key: digest} of the
    files the stage reads besides its rows (Stage.inputs), compared with those its manifest recorded."""
    if manifest is None:
        return Decision(RUN, "not committed yet")
    if overwrite:
        return Decision(RUN, "--overwrite")
    if upstream_ran:
        return Decision(RUN, "a stage before it runs again")
    changed = tuple(changed_keys(manifest.get("config", {}), config, stage.config_keys, stage.runtime))
    recorded_inputs = manifest.get("inputs") or {}
    changed += tuple(f"{key} (its content)" for key, digest in (inputs or {}).items()
                     if key not in changed and recorded_inputs.get(key, digest) != digest)
    recorded = manifest.get("source")
    other_input = source is not None and recorded is not None and recorded != source
    chain = manifest.get("chain") or []
    read = chain[-2][0] if len(chain) >= 2 else None
    other_chain = previous is not None and read is not None and read != previous
    if not (changed or other_input or other_chain):
        return Decision(REUSE)
    why = ", ".join(filter(None, [
        f"other settings ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else "",
        "another input" if other_input else "",
        f"another chain (it read {read}, this run's stage before it is {previous})" if other_chain else ""]))
    expensive = () if work_done else stage.expensive_keys
    if not expensive:
        return Decision(RESELECT, why, changed)
    redo = [k for k in changed if any(k == e or k.startswith(e + ".") or e.startswith(k + ".") for e in expensive)]
    upstream = (other_input or other_chain) and stage.reads is not None
    if owns_chain and upstream and not redo:
        return Decision(RUN, why, changed)  # the rows it read changed: its expensive work sees the new ones
    if stage.keeps_scores and not redo and not other_input:
        return Decision(RESELECT, why, changed)
    return Decision(REFUSE, why, changed)


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
    from capfilt.pipelines.config import config_class
    defaults = config_class()().to_dict()
    changed = []
    for key in keys:
        now, default = _get(config, key), _get(defaults, key)
        before = _get(used, key) if _has(used, key) else default
        if isinstance(before, dict) and isinstance(now, dict):
            default = default if isinstance(default, dict) else {}
            # A key neither this version nor its defaults know was moved or removed: not a change.
            changed += [f"{key}.{k}" for k in sorted(set(before) | set(now)) if k not in skip
                        and (k in now or k in default) and before.get(k, default.get(k)) != now.get(k)]
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
