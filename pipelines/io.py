"""Reading and writing stage outputs with Spark, in the layout of capfilt.pipelines.output."""
from __future__ import annotations

from capfilt.pipelines.output import read_manifest
from capfilt.schemas import REJECTS, Contract


def read_stage(spark, root: str, contract: Contract):
    """The committed records of a stage, validated against its contract."""
    read_manifest(root)  # refuses an uncommitted directory
    path = f"{str(root).rstrip('/')}/data"
    df = spark.read.option("pathGlobFilter", "*.parquet").parquet(path)
    contract.validate(df, where=path)
    return df


def read_rejects(spark, root: str):
    read_manifest(root)
    return spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{str(root).rstrip('/')}/rejects")


def empty_rejects(spark):
    return spark.createDataFrame([], REJECTS.spark_schema())


def parquet_rows(folder: str) -> int:
    """Rows in the Parquet files of a folder Spark wrote (partition folders included), from their
    footers, on the driver: no Spark job."""
    import fsspec
    import pyarrow.parquet as pq
    fs, path = fsspec.core.url_to_fs(folder)
    rows = 0
    for file in fs.find(path):
        relative = file[len(path.rstrip("/")) + 1:]
        if file.endswith(".parquet") and not any(part.startswith(("_", ".")) and "=" not in part
                                                 for part in relative.split("/")):
            with fs.open(file, "rb") as f:
                rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def count_rejects(spark, rejects_dir: str) -> dict[str, dict[str, int]]:
    """{stage: {reason: rows}} of a rejects folder: one row per (stage, reason), small enough for the driver."""
    rejected: dict[str, dict[str, int]] = {}
    for row in spark.read.parquet(rejects_dir).groupBy("stage", "reason").count().collect():
        rejected.setdefault(row["stage"], {})[row["reason"]] = row["count"]
    return rejected
