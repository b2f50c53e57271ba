"""spark-submit on a real Spark standalone cluster (a master and 2 workers on 127.0.0.1), where
capfilt's code reaches executors only through what `capfilt package` ships."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

SPARK_BIN = Path(sys.executable).parent.parent / "lib" / "python3.11" / "site-packages" / "pyspark" / "bin"
# Executors of a real cluster have capfilt's dependencies but not capfilt itself: this sitecustomize
# takes away the editable install the development venv has (it runs after site-packages' .pth files).
# Each Python it starts leaves a file in runs/ beside it: the proof that executors ran under it.
HIDE_CAPFILT = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if p.rstrip("/") != %r]
open(os.path.join(os.path.dirname(__file__), "runs", str(os.getpid())), "w").close()
""" % str(ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master + 2 one-core workers on 127.0.0.1; stopped at the end of the module."""
    work = tmp_path_factory.mktemp("cluster")
    hide = work / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_CAPFILT)
    (hide / "runs").mkdir()
    python = work / "executor-python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={hide} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(work / "logs"),
           "SPARK_WORKER_DIR": str(work / "work")}
    port, ui = _free_port(), _free_port()
    master = f"spark://127.0.0.1:{port}"
    cls = str(SPARK_BIN / "spark-class")
    procs = [subprocess.Popen([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                               str(port), "--webui-port", str(ui)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "master.log", "w"))]
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [cls, "org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1", "--cores", "1",
                 "--memory", "3g", "--webui-port", str(_free_port()), "--work-dir", str(work / f"w{i}")],
                env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"worker{i}.log", "w")))
        deadline = time.time() + 90
        while True:
            try:
                import json
                state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2))
                if sum(w["state"] == "ALIVE" for w in state["workers"]) == 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the standalone cluster did not come up in 90 s: {(work / 'master.log').read_text()[-2000:]}")
            time.sleep(1)
        yield master, str(python), work
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _submit(cluster, args, py_files=None, timeout=600):
    master, python, work = cluster
    # Shuffle partitions sized to the cluster's 2 cores, as docs/scaling.md asks of a user (Spark's 200
    # would be 200 tasks a shuffle); local mode's run uses another count, so the output must not depend on it.
    cmd = [str(SPARK_BIN / "spark-submit"), "--master", master,
           "--conf", "spark.sql.shuffle.partitions=4", "--conf", "spark.executor.cores=1",
           "--conf", "spark.executor.memory=2g", "--conf", "spark.driver.host=127.0.0.1",
           "--conf", "spark.driver.bindAddress=127.0.0.1", "--conf", "spark.ui.enabled=false",
           "--conf", f"spark.pyspark.python={python}", "--conf", f"spark.pyspark.driver.python={sys.executable}",
           *(["--py-files", py_files] if py_files else []), str(ROOT / "jobs" / "curate.py"), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(out: Path, name: str, columns: list[str]):
    table = pq.read_table(out / name, columns=columns).to_pandas()
    return table.sort_values(columns).reset_index(drop=True)


@pytest.mark.slow
def test_spark_submit_on_a_standalone_cluster_matches_local_mode(cluster, curate_args, curated_out, tmp_path):
    from capfilt.jobs.package import build_zip
    zipped = tmp_path / "capfilt-pyfiles.zip"
    names = build_zip(zipped)
    assert "capfilt/__init__.py" in names and "capfilt/udfs/models/__init__.py" in names
    assert all(name.startswith("capfilt/") for name in names)

    # Without the zip, executors cannot import capfilt (the classic shipping bug): the executor Python
    # hides the development install, and the run below proves its executors ran under that Python.
    _, python, work = cluster
    bare = subprocess.run([python, "-c", "import capfilt"], capture_output=True, text=True, cwd=work)
    assert bare.returncode != 0 and "No module named 'capfilt'" in bare.stderr
    runs = work / "hide" / "runs"
    for marker in runs.iterdir():
        marker.unlink()

    out = tmp_path / "out"
    run = _submit(cluster, [*curate_args, "--output", str(out)], py_files=str(zipped))
    assert run.returncode == 0, run.stderr[-4000:]
    assert any(runs.iterdir()), "the executors did not run under the Python without capfilt"
    assert (out / "manifest.json").exists()
    assert pq.read_table(out / "curated").num_rows == pq.read_table(curated_out / "curated").num_rows
    for name, columns in (("curated", ["uid", "sha256", "caption_primary"]),
                          ("rejects", ["uid", "stage", "reason", "duplicate_of"])):
        cluster_rows, local_rows = _rows(out, name, columns), _rows(curated_out, name, columns)
        assert cluster_rows.equals(local_rows), name
    scores = _rows(out, "curated", ["uid", "best_score"]).best_score
    assert (abs(scores - _rows(curated_out, "curated", ["uid", "best_score"]).best_score) < 1e-5).all()


def test_no_job_module_shadows_the_standard_library():
    """spark-submit runs jobs/<job>.py as a script, which puts jobs/ first on sys.path: a job module
    named like a stdlib module (jobs/inspect.py once) replaces it and breaks the driver at import."""
    names = {path.stem for path in (ROOT / "jobs").glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def test_pyproject_lists_every_package_under_capfilt():
    """setuptools installs what pyproject.toml lists: a new package folder (one with __init__.py) under
    schemas/, pipelines/... must be listed there, or a wheel install silently lacks it."""
    import tomllib
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"capfilt"} | {"capfilt." + ".".join(init.parent.relative_to(ROOT).parts)
                             for name in setuptools["package-dir"] if name != "capfilt"
                             for init in (ROOT / name.removeprefix("capfilt.")).rglob("__init__.py")
                             if "__pycache__" not in init.parts}
    assert set(setuptools["packages"]) == folders
    assert all(setuptools["package-dir"][f"capfilt.{name}"] == name for name in ("schemas", "pipelines", "udfs",
                                                                                  "net", "jobs", "world", "lab"))


def test_every_top_level_package_is_a_subpackage_everywhere_it_is_listed():
    """A top-level folder with __init__.py is a capfilt subpackage: pyproject.toml maps it (or a wheel
    lacks it), capfilt/__init__.py lists it (or an uninstalled checkout cannot import it) and
    `capfilt package` zips it (or executors cannot import it)."""
    import tomllib

    import capfilt
    from capfilt.jobs.package import PACKAGES
    folders = {init.parent.name for init in ROOT.glob("*/__init__.py")} - {"capfilt"}
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {name.removeprefix("capfilt.") for name in package_dir if name != "capfilt"} == folders
    assert set(capfilt._SUBPACKAGES) == folders
    assert set(PACKAGES) == folders


def test_package_zip_holds_every_subpackage(tmp_path):
    """The spark-submit zip holds each subpackage's __init__.py under capfilt/, net/ included."""
    from capfilt.jobs.package import PACKAGES, build_zip
    names = build_zip(tmp_path / "capfilt-pyfiles.zip")
    assert {f"capfilt/{package}/__init__.py" for package in PACKAGES} <= set(names)
    assert {"capfilt/net/fetch.py", "capfilt/net/robots.py", "capfilt/net/netguard.py",
            "capfilt/net/polite.py"} <= set(names)
