"""The one place a SparkSession is made.

Local mode by default, bound to loopback; under spark-submit the master and every --conf given there
win over our defaults. Arrow settings sized for rows that carry image bytes.
"""
from __future__ import annotations

import os
import re
import sys

from capfilt.pipelines.config import SparkSettings

# Spark settings every capfilt session wants; user conf (settings.conf, spark-submit --conf) overrides.
DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Model caches live in the Python worker: a worker per task would reload the model every task.
    "spark.python.worker.reuse": "true",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.ui.showConsoleProgress": "true",
}


def launched_by_spark_submit() -> bool:
    # spark-submit's PythonRunner starts the JVM first and hands the gateway to Python via these.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_conf(settings: SparkSettings, master: str) -> dict[str, str]:
    conf = dict(DEFAULTS)
    conf["spark.app.name"] = settings.app_name
    conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(settings.arrow_batch_size)
    local = master.startswith("local")
    if settings.shuffle_partitions:
        conf["spark.sql.shuffle.partitions"] = str(settings.shuffle_partitions)
    elif local:
        # Spark's 200 is sized for a cluster; on one machine each shuffle partition is a task on a few
        # cores (dedup of 9,636 rows on 2 cores: 89.6 s with 8 partitions, 122.2 s with 200).
        conf["spark.sql.shuffle.partitions"] = str(4 * local_cores(master))
    if local:
        # Without these Spark binds the machine's first non-loopback address.
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
        conf["spark.driver.memory"] = settings.driver_memory
    conf.update(settings.conf)
    return conf


def local_cores(master: str) -> int:
    """The worker threads of a local master: local, local[N], local[*], local[N,F], local[*,F]."""
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if match is None or match.group(1) == "*":
        return os.cpu_count() or 1
    return max(1, int(match.group(1) or 1))


def spark_session(settings: SparkSettings | None = None):
    """Return the SparkSession for a capfilt job (the active one if a caller already made it)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    settings = settings or SparkSettings()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    submitted = launched_by_spark_submit()
    builder = SparkSession.builder
    if submitted:
        SparkContext._ensure_initialized()
        given = SparkConf()  # now holds spark-submit's --master and --conf
        master = given.get("spark.master", "")
        conf = {k: v for k, v in spark_conf(settings, master).items()
                if not given.contains(k)}
    else:
        master = settings.master
        if master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Executors must run this interpreter (the venv's), not whatever `python3` is first on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.master(master)
        conf = spark_conf(settings, master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark


def ui_url(spark) -> str | None:
    return spark.sparkContext.uiWebUrl
