import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capfilt.pipelines.config import SparkSettings
from capfilt.pipelines.session import spark_conf
from tests.conftest import ROOT


def test_local_session_binds_loopback_with_arrow_settings(spark):
    conf = spark.sparkContext.getConf()
    assert spark.sparkContext.master == "local[2]"
    assert conf.get("spark.driver.host") == "127.0.0.1"
    assert conf.get("spark.driver.bindAddress") == "127.0.0.1"
    assert conf.get("spark.python.worker.reuse") == "true"
    assert conf.get("spark.sql.execution.arrow.maxRecordsPerBatch") == "512"
    assert spark.range(100).selectExpr("sum(id)").first()[0] == 4950


def test_user_conf_overrides_capfilt_defaults():
    conf = spark_conf(SparkSettings(arrow_batch_size=64, conf={"spark.python.worker.reuse": "false"}), "local[2]")
    assert conf["spark.sql.execution.arrow.maxRecordsPerBatch"] == "64"
    assert conf["spark.python.worker.reuse"] == "false"
    assert "spark.driver.host" not in spark_conf(SparkSettings(), "spark://127.0.0.1:7077")


def test_local_mode_sizes_shuffle_partitions_to_its_cores():
    assert spark_conf(SparkSettings(), "local[2]")["spark.sql.shuffle.partitions"] == "8"
    assert spark_conf(SparkSettings(), "local")["spark.sql.shuffle.partitions"] == "4"
    assert spark_conf(SparkSettings(), "local[*]")["spark.sql.shuffle.partitions"] == str(4 * os.cpu_count())
    assert spark_conf(SparkSettings(shuffle_partitions=3), "local[2]")["spark.sql.shuffle.partitions"] == "3"
    # a cluster keeps Spark's default (or spark-submit's --conf)
    assert "spark.sql.shuffle.partitions" not in spark_conf(SparkSettings(), "spark://127.0.0.1:7077")


@pytest.mark.slow
def test_under_spark_submit_the_given_master_and_conf_win(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        from capfilt.pipelines.config import SparkSettings
        from capfilt.pipelines.session import spark_session
        s = spark_session(SparkSettings(master="local[2]", arrow_batch_size=512))
        c = s.sparkContext.getConf()
        print("RESULT", s.sparkContext.master, c.get("spark.sql.execution.arrow.maxRecordsPerBatch"),
              c.get("spark.python.worker.reuse"))
        s.stop()
    """))
    submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run([str(submit), "--master", "local[1]", "--conf",
                           "spark.sql.execution.arrow.maxRecordsPerBatch=77", str(script)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT local[1] 77 true"], proc.stdout
