"""Running a model's batch function over a DataFrame.

CPU (and local mode): an iterator pandas UDF over just the columns the model needs, so image bytes
are not shipped back. Cluster with GPUs (`gpus_per_task > 0`): `mapInPandas` with a ResourceProfile,
the only form stage-level scheduling attaches to (Spark refuses profiles in local mode); it returns
the rows without the image bytes it read.
The batch function maps a pandas DataFrame of the input columns to a pandas DataFrame whose columns
are the fields of the output struct; it must be deterministic (a lost partition is recomputed).
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import pandas as pd

PASS = "_inference"  # the struct column a model pass adds (error and each model's fields)


def apply_batches(df, batch_fn: Callable, columns: list[str], out_type, gpus_per_task: float = 0.0,
                  cpus_per_task: int = 1):
    """A struct column `_inference` of type out_type, computed by batch_fn on `columns`, beside df's rows.

    The result's columns: on the CPU path every column of df, then `_inference` (the image bytes stay
    in the JVM: only `columns` travel to Python, only `_inference` comes back). With gpus_per_task > 0
    every column of df except the binary columns among `columns` (the image bytes the batch function
    read), in df's order, then `_inference`. Callers that need the same columns on both paths use the
    non-image columns and `_inference`."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    if gpus_per_task > 0:
        return _map_in_pandas(df, batch_fn, columns, out_type, gpus_per_task, cpus_per_task)

    if len(columns) < 2:
        raise ValueError("apply_batches takes two or more input columns")

    # Spark picks the iterator-of-tuples UDF form from these type hints.
    def run(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        for series in batches:
            frame = pd.concat(list(series), axis=1)
            frame.columns = columns
            yield batch_fn(frame)

    return df.withColumn(PASS, pandas_udf(run, out_type)(*[F.col(c) for c in columns]))


def _map_in_pandas(df, batch_fn, columns, out_type, gpus_per_task, cpus_per_task):
    """mapInPandas with a ResourceProfile. The result holds every column of df except the binary
    columns among `columns` (the image bytes the batch function read: shipping them back to the JVM
    would double the task's traffic for nothing), in df's order, then `_inference`."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
    from pyspark.sql.types import StructField, StructType

    master = df.sparkSession.sparkContext.master
    if master.startswith("local"):
        raise ValueError(f"gpus_per_task > 0 needs a cluster master (stage-level scheduling is refused in "
                         f"{master}); set it to 0 to run on the CPU or the local GPU")
    profile = ResourceProfileBuilder().require(
        TaskResourceRequests().cpus(cpus_per_task).resource("gpu", gpus_per_task)).build
    kept = kept_fields(df.schema, columns)
    schema = StructType(kept + [StructField(PASS, out_type, True)])
    return df.mapInPandas(MapBatches(batch_fn, columns, [f.name for f in kept]), schema, profile=profile)


def kept_fields(schema, columns: list[str]) -> list:
    """The fields of `schema` that the GPU path returns: all but the binary columns it reads."""
    from pyspark.sql.types import BinaryType
    read = set(columns)
    return [f for f in schema.fields if not (f.name in read and isinstance(f.dataType, BinaryType))]


class MapBatches:
    """mapInPandas's function: per input frame, the kept columns + `_inference` (a dict per row)."""

    def __init__(self, batch_fn: Callable, columns: list[str], kept: list[str]):
        self.batch_fn, self.columns, self.kept = batch_fn, columns, kept

    def __call__(self, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            out = self.batch_fn(frame[self.columns])
            result = frame[self.kept].copy()
            result[PASS] = out.to_dict("records")
            yield result

