"""Running a model's batch function over a DataFrame.

CPU (and local mode): an iterator pandas UDF over just the columns the model needs, so image bytes
are not shipped back. Cluster with GPUs (`gpus_per_task > 0`): `mapInPandas` with a ResourceProfile,
the only form stage-level scheduling attaches to (Spark refuses profiles in local mode).
The batch function maps a pandas DataFrame of the input columns to a pandas DataFrame whose columns
are the fields of the output struct; it must be deterministic (a lost partition is recomputed).
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import pandas as pd

OUT = "_inference"


def apply_batches(df, batch_fn: Callable, columns: list[str], out_type, gpus_per_task: float = 0.0,
                  cpus_per_task: int = 1):
    """df + a struct column `_inference` of type out_type computed by batch_fn on `columns`."""
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

    return df.withColumn(OUT, pandas_udf(run, out_type)(*[F.col(c) for c in columns]))


def _map_in_pandas(df, batch_fn, columns, out_type, gpus_per_task, cpus_per_task):
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
    from pyspark.sql.types import StructField, StructType

    master = df.sparkSession.sparkContext.master
    if master.startswith("local"):
        raise ValueError(f"gpus_per_task > 0 needs a cluster master (stage-level scheduling is refused in "
                         f"{master}); set it to 0 to run on the CPU or the local GPU")
    profile = ResourceProfileBuilder().require(
        TaskResourceRequests().cpus(cpus_per_task).resource("gpu", gpus_per_task)).build
    schema = StructType(df.schema.fields + [StructField(OUT, out_type, True)])

    def run(frames):
        for frame in frames:
            out = batch_fn(frame[columns])
            frame[OUT] = out.to_dict("records")
            yield frame

    return df.mapInPandas(run, schema, profile=profile)


def worker_model(settings, cached):
    """The stage's model in this Python worker: threads set, loaded once (capfilt.udfs.models cache)."""
    set_torch_threads(settings.torch_threads)
    return cached(settings.model, None if settings.device == "auto" else settings.device)


def set_torch_threads(threads: int) -> None:
    """Python workers share the machine's cores: an explicit thread count beats torch's default when
    several workers run (measured: see docs/benchmarks.md). 0 leaves torch's default."""
    if threads > 0:
        import torch
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
