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
        root = str(root).rstrip("/")
        self.local = "://" not in root or root.startswith("file://")
        path = PurePosixPath(root.split("://")[-1])
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
        if self.complete and not (self.overwrite or force):
            return False
        self.fs.makedirs(self._parent, exist_ok=True)
        self.tmp = f"{self._parent}/.{self._name}.inprogress"
        if self.fs.exists(self.tmp) and not resume:
            self.fs.rm(self.tmp, recursive=True)  # left by a killed run
        self.fs.makedirs(self.tmp, exist_ok=True)
        self.started = time.time()
        return True

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
