import os
import sys
from pathlib import Path

# The environment the README asks for, also when pytest is run by hand.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spark():
    from pipelines.config import SparkSettings
    from pipelines.session import spark_session
    session = spark_session(SparkSettings(master="local[2]", shuffle_partitions=4, log_level="ERROR",
                                          conf={"spark.ui.enabled": "false"}))
    yield session
    session.stop()
