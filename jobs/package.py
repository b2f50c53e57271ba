"""`capfilt package`: build what spark-submit ships to executors.

On a cluster, capfilt's code reaches the executors only through `--py-files` (or an installed
package): without it every task fails with ModuleNotFoundError, while the same command passes in
local mode. This writes one zip of capfilt's packages (schemas, pipelines, udfs, net, jobs, world, lab)
with their data files, and prints the spark-submit line that ships it. The executors still need
capfilt's dependencies (torch, open_clip, faiss...) in their Python: an image or a packed venv
(docs/cluster.md... see the README's spark-submit section).
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

# The folder holding the subpackages: the checkout (editable install) or site-packages/capfilt (wheel).
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipelines", "udfs", "net", "jobs", "world", "lab")
SUFFIXES = (".py", ".yaml", ".json")


def members() -> list[tuple[str, Path]]:
    """(name in the zip, file): capfilt/__init__.py, then capfilt/<package>/... in sorted order."""
    init = next(p for p in (ROOT / "capfilt" / "__init__.py", ROOT / "__init__.py") if p.is_file())
    found = [("capfilt/__init__.py", init)]
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                found.append((f"capfilt/{path.relative_to(ROOT).as_posix()}", path))
    return found


def build_zip(target: Path) -> list[str]:
    """Write the zip (deterministic: sorted names, fixed timestamps) and return its member names."""
    names = []
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in members():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
            names.append(name)
    partial.replace(target)
    return names


def check_target(target: Path) -> None:
    """The zip may replace only an earlier capfilt zip: refuse, before writing, a --out that is a file
    (or under one), and a target that is a folder or a file capfilt did not write."""
    folder = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not folder.is_dir():
        raise ValueError(f"--out {target.parent}: {folder} is a file, not a folder")
    if target.is_dir():
        raise ValueError(f"{target} is a folder: not an earlier capfilt zip, choose another --out")
    if target.exists():
        try:
            with zipfile.ZipFile(target) as zf:
                ours = all(name.startswith("capfilt/") for name in zf.namelist())
        except (OSError, zipfile.BadZipFile):
            ours = False
        if not ours:
            raise ValueError(f"{target} exists and is not a capfilt zip: choose another --out")


def main(argv=None) -> int:
    from importlib import metadata
    p = argparse.ArgumentParser(prog="capfilt package", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dist", help="folder for the zip (default: dist)")
    args = p.parse_args(argv)
    version = metadata.version("capfilt")
    target = Path(args.out) / f"capfilt-{version}-pyfiles.zip"
    check_target(target)
    names = build_zip(target)
    print(f"{target}: {len(names)} files from {', '.join(PACKAGES)}")
    print(f"ship it with:  spark-submit --py-files {target} jobs/curate.py --input ... --output ...")
    return 0


if __name__ == "__main__":
    from capfilt.jobs.common import run
    sys.exit(run(main))
