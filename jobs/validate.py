"""`capfilt validate PATH --contract NAME`: check Parquet data against a contract (no Spark needed).

PATH may be a Parquet file, a folder of them, or a stage output directory (its data/ is checked, or
its rejects/ with --contract rejects). Exit 0 when it matches; otherwise every problem is listed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.dataset as ds

from capfilt.schemas import CONTRACTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="capfilt validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--contract", required=True, choices=sorted(CONTRACTS))
    args = parser.parse_args(argv)
    path = Path(args.path)
    if (path / "manifest.json").exists():
        path = path / ("rejects" if args.contract == "rejects" else "data")
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    dataset = ds.dataset(str(path), format="parquet", exclude_invalid_files=False,
                         ignore_prefixes=[".", "_"])
    CONTRACTS[args.contract].validate(dataset.schema, where=str(path))
    print(f"{path}: matches the '{args.contract}' contract ({dataset.count_rows()} rows)")
    return 0
