"""Reading and writing stage outputs with Spark, in the layout of capfilt.pipelines.output."""
from __future__ import annotations

from capfilt.pipelines.output import Counts, StageOutput, read_manifest
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


def write_stage(out: StageOutput, data, rejects, input_count: int, compression: str = "zstd") -> Counts:
    """Write records and rejects into the in-progress directory and count them from the files written
    (not from the plan: what a reader will see is what gets counted)."""
    spark = data.sparkSession
    codec = "uncompressed" if compression == "none" else compression
    REJECTS.validate(rejects, where=f"{out.stage} rejects")
    data.write.option("compression", codec).mode("overwrite").parquet(out.data_dir)
    rejects.select(*REJECTS.names).write.option("compression", codec).mode("overwrite").parquet(out.rejects_dir)
    output = parquet_rows(out.data_dir)
    rejected: dict[str, dict[str, int]] = {}
    # One row per (stage, reason): tiny, safe to bring to the driver.
    for row in spark.read.parquet(out.rejects_dir).groupBy("stage", "reason").count().collect():
        rejected.setdefault(row["stage"], {})[row["reason"]] = row["count"]
    return Counts(input=input_count, output=output, rejected=rejected)
