"""Atomic, resumable stage output.

Every stage writes one directory:
    <root>/data/          the stage's records (Parquet)
    <root>/rejects/       rows this stage dropped (Parquet, capfilt.schemas.REJECTS)
    <root>/manifest.json  config, versions, timings and counts; written last
All of it is first written to a hidden sibling `.<name>.inprogress` (Spark and Hadoop readers skip
names starting with '.'), then renamed into place. A directory without manifest.json is never a finished
output: `read_stage` refuses it. A killed run leaves only the hidden in-progress directory, which the
next run clears, or continues from when the stage can resume (download). Rename is atomic on local and HDFS file systems, not on object stores (docs/output.md).
"""
from __future__ import annotations

import json
import platform
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import PurePosixPath

import fsspec

MANIFEST = "manifest.json"


class ConservationError(RuntimeError):
    """Counts do not add up: input != output + rejected. The output is not committed."""


class NotCommittedError(FileNotFoundError):
    pass


class OutputInUse(RuntimeError):
    """Another capfilt process is writing the same output."""


class OutputLock:
    """A lock on an output folder, `<parent>/.<name>.lock`, held with flock so that the kernel releases
    it when the process dies (a crashed or killed run never leaves it stuck). A writer (curate, a
    stage, export's target) holds it alone and names its pid in the file; readers (export, inspect)
    share it, so nothing rewrites an output while it is read. Local and mounted file systems only: on
    an object store (s3://...) there is nothing to lock and the lock is a no-op."""

    def __init__(self, root: str, shared: bool = False):
        root = str(root).rstrip("/") or "/"
        self.local = "://" not in root or root.startswith("file://")
        # The folder, not its spelling: a symlink, `..` or a relative path to the same OUT names the same
        # lock (the parts that do not exist yet are kept as typed, below the resolved ones).
        path = PurePosixPath(local_path(root) if self.local else root.split("://")[-1])
        self.root = str(path)
        self.path = str(path.parent / f".{path.name}.lock")
        self.shared = shared
        self._file = None

    def __enter__(self) -> "OutputLock":
        if not self.local:
            return self
        import fcntl
        import os
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                who = f"in use by pid {holder}" if holder else "being read by another capfilt process (export, inspect)"
                raise OutputInUse(f"{self.root} is {who} (lock {self.path}); wait for it to finish or stop it") from None
            # A writer before us may have removed the file after we opened it: lock the file that is there.
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        if not self.shared:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} on {platform.node()}\n")
            f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            import fcntl
            import os
            try:  # the last holder removes the file, while it holds it alone: others re-check the inode (above)
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(self.path)
            except (BlockingIOError, FileNotFoundError):
                pass  # other readers still hold it
            self._file.close()
            self._file = None


@dataclass
class Counts:
    input: int
    output: int
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> reason -> rows

    @property
    def rejected_total(self) -> int:
        return sum(n for reasons in self.rejected.values() for n in reasons.values())

    def check(self) -> None:
        if self.input != self.output + self.rejected_total:
            raise ConservationError(
                f"counts do not add up: input {self.input} != output {self.output} + rejected "
                f"{self.rejected_total} ({self.rejected}); {self.input - self.output - self.rejected_total:+d} "
                f"rows unaccounted for. Nothing was committed.")

    def to_dict(self) -> dict:
        return {"input": self.input, "output": self.output, "rejected_total": self.rejected_total,
                "rejected": self.rejected}


class StageOutput:
    def __init__(self, root: str, stage: str, overwrite: bool = False):
        self.root = str(root).rstrip("/")
        self.stage = stage
        self.overwrite = overwrite
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self._parent = str(PurePosixPath(self._path).parent)
        self._name = PurePosixPath(self._path).name
        self.tmp: str | None = None
        self.started = time.time()

    @property
    def complete(self) -> bool:
        return self.fs.exists(f"{self._path}/{MANIFEST}")

    def begin(self, resume: bool = False, force: bool = False) -> bool:
        """Prepare to write. False when the output is already committed and neither overwrite nor
        force is set (skip). With resume, a killed run's in-progress directory is kept to continue."""
        check_replaceable(self.root, self.stage)  # the commit replaces the folder whole: only ours
        if self.complete and not (self.overwrite or force):
            return False
        self.fs.makedirs(self._parent, exist_ok=True)
        self.tmp = f"{self._parent}/.{self._name}.inprogress"
        if self.fs.exists(self.tmp) and not resume:
            self.fs.rm(self.tmp, recursive=True)  # left by a killed run
        self.fs.makedirs(self.tmp, exist_ok=True)
        self.started = time.time()
        return True

    def resume(self, fingerprint: str, marker: str = "fingerprint") -> bool:
        """The one resume rule of every stage: a killed run's work in the in-progress directory (the
        download's prepared plan and finished shards, a model pass's finished parts: each unit marks itself
        done there) is continued when `marker` there holds the same fingerprint of input and settings;
        otherwise the directory starts over and the marker is written. Returns whether work is continued."""
        path = f"{self.tmp}/{marker}"
        if self.fs.exists(path):
            if self.fs.cat(path).decode() == fingerprint:
                return True
            print("The unfinished run at this output used other input or settings: starting over.", flush=True)
            self.begin(resume=False, force=True)
        self.fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        self.fs.pipe(path, fingerprint.encode())
        return False

    def path(self, name: str) -> str:
        """A path inside the in-progress directory (work files that commit along, or get removed)."""
        return self._url(f"{self.tmp}/{name}")

    def remove(self, name: str) -> None:
        if self.fs.exists(f"{self.tmp}/{name}"):
            self.fs.rm(f"{self.tmp}/{name}", recursive=True)

    def _url(self, path: str) -> str:
        # Keep the caller's scheme (s3://, hdfs://) so Spark writes where fsspec commits.
        proto = self.root.split("://")[0] if "://" in self.root else None
        return f"{proto}://{path.split('://')[-1]}" if proto and proto != "file" else path

    @property
    def data_dir(self) -> str:
        return self.path("data")

    @property
    def rejects_dir(self) -> str:
        return self.path("rejects")

    def commit(self, manifest: dict) -> None:
        """Write manifest.json last, then move the whole directory into place."""
        assert self.tmp is not None, "begin() first"
        self.fs.pipe(f"{self.tmp}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())
        move_into_place(self.fs, self.tmp, self._path)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp and self.fs.exists(self.tmp):
            self.fs.rm(self.tmp, recursive=True)
        self.tmp = None


def move_into_place(fs, work: str, target: str) -> None:
    """The one atomic commit (stages, the write step, export): rename the finished work folder onto
    target; an old target is moved aside first and removed last, so at every moment target is either
    the old folder or the whole new one."""
    path = PurePosixPath(target)
    old = None
    if fs.exists(target):
        old = str(path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
        fs.mv(target, old, recursive=True)
    fs.mv(work, target, recursive=True)
    if old:
        fs.rm(old, recursive=True)


def read_manifest(root: str) -> dict:
    fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
    try:
        return json.loads(fs.cat(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        raise NotCommittedError(
            f"{root} is not a committed stage output (no {MANIFEST}): the stage that writes it has not "
            f"finished. Run it (again); a killed run leaves nothing a reader could take for finished.") from None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("capfilt", "pyspark", "pyarrow", "img2dataset", "open_clip_torch", "torch",
                 "transformers", "faiss-cpu", "datasketch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(out: StageOutput, config: dict, counts: Counts, **extra) -> dict:
    """The run manifest; refuses (ConservationError) when counts do not add up."""
    counts.check()
    finished = time.time()
    return {
        "stage": out.stage,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(out.started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "seconds": round(finished - out.started, 3),
        "versions": versions(),
        "config": config,
        "counts": counts.to_dict(),
        **extra,
    }


# ---------------------------------------------------------------------------------------------------
# What capfilt may replace. A commit replaces a folder whole (move_into_place): capfilt replaces only
# what it wrote there, recognised by its own manifest, never a folder that merely has the same name.

def local_path(root: str) -> str:
    """A local path or file:// URL as the absolute path of the folder it names, symlinks resolved (the
    parts that do not exist yet are kept as typed below the resolved ones)."""
    import os
    text = str(root)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.realpath(os.path.expanduser(text))


def enclosing_out(stage_root: str) -> str | None:
    """The `capfilt curate` output a stage output belongs to: OUT for OUT/stages/<stage> (a local path
    resolved first, so a link to the stage folder counts too), else None."""
    text = str(stage_root).rstrip("/")
    if "://" not in text or text.startswith("file://"):
        path = PurePosixPath(local_path(text))
        return str(path.parent.parent) if path.parent.name == "stages" and len(path.parts) > 3 else None
    parts = text.rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[1] == "stages" and "/" in parts[0].split("://", 1)[1] else None


def enclosing_lock(stage_root: str):
    """For a stage command: the lock on the OUT its output lies in (OUT/stages/<stage>), held alone
    while the stage runs, so that no curate, export or inspect uses OUT meanwhile; a no-op for a stage
    output of its own. (curate holds OUT's lock itself and runs its stages inside it.)"""
    from contextlib import nullcontext
    out = enclosing_out(stage_root)
    return OutputLock(out) if out else nullcontext()


def output_kind(root: str) -> str | None:
    """What capfilt wrote at root, from its manifest: a stage name, 'curate', or None (no manifest, or
    one capfilt did not write)."""
    fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
    try:
        manifest = json.loads(fs.cat(f"{path}/{MANIFEST}"))
    except (OSError, ValueError):  # missing, a folder, unreadable, not JSON
        return None
    stage = manifest.get("stage") if isinstance(manifest, dict) else None
    return stage if isinstance(stage, str) else None


def _described(kind: str) -> str:
    return "a `capfilt curate` output" if kind == "curate" else f"the {kind} stage's output"


STAGE_ENTRIES = frozenset({"data", "rejects", "model", "input", MANIFEST})  # what a committed stage holds


# What Spark writes in a folder: part files, its _SUCCESS marker, Hadoop's checksums; capfilt_part=<i>/.
SPARK_FILE = re.compile(r"^(\.?part-\d{5}-[0-9a-f-]{36}-c\d{3}[.\w]*\.parquet(\.crc)?|\.?_SUCCESS(\.crc)?|capfilt_part=\d+)$")


def _stage_layout(fs, path: str, entries: list[str]) -> bool:
    """A folder laid out as a stage output that lost its manifest: only a stage's entries, rejects/
    committed by Spark (its _SUCCESS), and in data/ and rejects/ only what Spark writes."""
    if not set(entries) <= STAGE_ENTRIES or "rejects" not in entries or not fs.exists(f"{path}/rejects/_SUCCESS"):
        return False
    return all(SPARK_FILE.match(PurePosixPath(child).name)
               for name in ("data", "rejects") if name in entries for child in fs.ls(f"{path}/{name}", detail=False))


def check_replaceable(root: str, stage: str) -> None:
    """Refuse (ValueError) to commit `stage`'s output at root unless what is there is capfilt's to
    replace: nothing, an empty folder, or a committed output of the same stage. Checked before any
    work by the stage commands, and again when a stage begins."""
    fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise ValueError(f"output {root} is a file, not a folder; choose another output")
    kind = output_kind(root)
    if kind == stage:
        return
    entries = sorted(PurePosixPath(e).name for e in fs.ls(path, detail=False))
    if not entries:
        return
    if kind is None and _stage_layout(fs, path, entries):
        return  # a stage folder that lost its manifest (a move cut short on an object store, a hand edit)
    if kind is None:
        raise ValueError(f"output {root} holds files capfilt did not write ({', '.join(entries[:3])}"
                         f"{', ...' if len(entries) > 3 else ''}; no capfilt {MANIFEST}), and a stage replaces its "
                         f"output folder whole: choose a new or empty folder")
    raise ValueError(f"output {root} holds {_described(kind)}, not the {stage} stage's, and a stage replaces its "
                     f"output folder whole: choose another output")


def check_out_replaceable(root: str) -> None:
    """Refuse (ValueError) a curate output folder where curate would replace something capfilt did not
    write. Curate replaces OUT's manifest.json, curated/, rejects/ and stages/<stage>/ and leaves
    anything else in OUT alone; so each of those that is there must be capfilt's: a curate manifest,
    each stage folder its stage's output, and curated/ or rejects/ only beside a curate manifest or a
    committed stage (a write step killed after it removed the manifest)."""
    from capfilt.pipelines.registry import names
    fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
    if not fs.isdir(path):
        return  # not there yet (a file is refused by the output path check)
    kind = output_kind(root)
    if fs.exists(f"{path}/{MANIFEST}") and kind != "curate":
        what = _described(kind) if kind else f"a {MANIFEST} capfilt did not write"
        raise ValueError(f"output {root} holds {what}, not a `capfilt curate` output, and curate would replace "
                         f"it: choose another output")
    committed = []
    if fs.exists(f"{path}/stages"):
        if not fs.isdir(f"{path}/stages"):
            raise ValueError(f"output {root}: {root}/stages is a file capfilt did not write; choose another output")
        for stage in names():
            if fs.exists(f"{path}/stages/{stage}"):
                check_replaceable(f"{str(root).rstrip('/')}/stages/{stage}", stage)
                committed += [stage] if output_kind(f"{str(root).rstrip('/')}/stages/{stage}") == stage else []
    if kind != "curate" and not committed:
        for name in ("curated", "rejects"):
            if fs.exists(f"{path}/{name}"):
                raise ValueError(f"output {root} holds {name}/, which capfilt did not write (no curate {MANIFEST}, "
                                 f"no committed stage), and curate would replace it: choose another output")


# ---------------------------------------------------------------------------------------------------
# A finished OUT is current while every stage folder under OUT/stages is the one its curated rows were
# written from. The write step records a digest of each stage's manifest.json (`stage_manifests`); a
# stage committed since (a stage command writing into OUT, a folder copied in by hand) has another one.

class OutputStale(ValueError):
    """OUT/curated was written from stage outputs that have been replaced since."""


def manifest_digest(root: str) -> str | None:
    """sha256 of root/manifest.json as stored; None when there is none."""
    import hashlib
    fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
    try:
        return hashlib.sha256(fs.cat(f"{path}/{MANIFEST}")).hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def changed_stages(out_root: str, manifest: dict) -> list[str]:
    """The stages of a finished OUT whose committed output is not the one its curated rows came from. A
    stage folder that is gone (removed to save space) is not one: nothing reads it in its place. An OUT
    written before the digests were recorded is compared by each stage's finish time."""
    root = str(out_root).rstrip("/")
    recorded = manifest.get("stage_manifests")
    changed = []
    if isinstance(recorded, dict):
        for stage, digest in recorded.items():
            now = manifest_digest(f"{root}/stages/{stage}")
            if now is not None and now != digest:
                changed.append(stage)
        return changed
    for stage, figures in (manifest.get("stages") or {}).items():
        finished = figures.get("finished_at") if isinstance(figures, dict) else None
        if finished is None or stage == "write":  # a filter step (the prefilter) has no folder of its own
            continue
        try:
            now = read_manifest(f"{root}/stages/{stage}").get("finished_at")
        except (NotCommittedError, ValueError, OSError):
            continue
        if now != finished:
            changed.append(stage)
    return changed


def recorded_input(out_root: str) -> str | None:
    """The input the download of OUT (or of a download output) read, as its manifest records it."""
    root = str(out_root).rstrip("/")
    for where in (f"{root}/stages/download", root):
        try:
            spec = read_manifest(where).get("input")
        except (NotCommittedError, ValueError, OSError):
            continue
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            return spec["path"]
    return None


def input_location(spec: str):
    """A local input as the file or folder it reads, resolved (a glob stands for the folder it
    searches); None for a URL."""
    from pathlib import Path
    if "://" in spec and not spec.startswith("file://"):
        return None
    parts = Path(spec.removeprefix("file://")).parts
    cut = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return Path(*parts[:cut]).resolve() if cut else Path.cwd()


def check_current(out_root: str, manifest: dict) -> None:
    """Refuse (OutputStale) a finished OUT with a stage replaced after its curated rows were written,
    naming the command that rebuilds it."""
    import shlex
    if manifest.get("stage") != "curate":
        return
    changed = changed_stages(out_root, manifest)
    if not changed:
        return
    root = str(out_root).rstrip("/")
    source = recorded_input(root)
    command = f"capfilt curate --input {shlex.quote(source) if source else 'INPUT'} --output {shlex.quote(root)}"
    raise OutputStale(
        f"{root} is stale: {', '.join(f'stages/{s}' for s in changed)} changed after its curated rows were written "
        f"(a stage command or a hand edit), so curated/ and {MANIFEST} no longer match its stages. Rebuild it: "
        f"rerun `{command}` with the options and settings that made it (its {MANIFEST} has them); it recomputes "
        f"what the change affects and writes curated/ and the manifest again")
