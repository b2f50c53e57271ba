"""Faults, each compared with a clean run of the same input: a Python worker killed mid-stage, and
the curate job killed during its final write."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _python_workers(root: int) -> list[int]:
    """Forked Python workers under a pyspark.daemon anywhere below root (not the daemons)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            if "pyspark.daemon" in _cmdline(child) and "pyspark.daemon" in _cmdline(pid):
                found.append(child)
            todo.append(child)
    return found


def _sorted(path: Path, columns: list[str]):
    return pq.read_table(path, columns=columns).to_pandas().sort_values(columns[0]).reset_index(drop=True)


@pytest.mark.slow
def test_a_python_worker_killed_during_caption_is_retried_and_the_output_is_identical(curated_out, curate_args,
                                                                                      tmp_path):
    out = tmp_path / "caption"
    overrides = [a for i, a in enumerate(curate_args) if a == "--set" or (i and curate_args[i - 1] == "--set")]
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "caption", "--input", str(curated_out / "stages" / "download"),
           "--output", str(out), *overrides, "--set", "spark.master=local[2,4]",  # 4 attempts per task
           "--set", "caption.rows_per_part=40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.time() + 240
    try:
        while killed is None and proc.poll() is None and time.time() < deadline:
            if _python_workers(proc.pid):
                time.sleep(2)  # let the worker load the model and start on its batch
                workers = _python_workers(proc.pid)
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
            time.sleep(0.2)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no Python worker was seen to kill"
    assert proc.returncode == 0, log[-3000:]
    assert "Python worker exited unexpectedly" in log or "Lost task" in log or "failed 1 time" in log, log[-3000:]
    columns = ["uid", "synthetic_captions"]
    clean = _sorted(curated_out / "stages" / "caption" / "data", columns)
    again = _sorted(out / "data", columns)
    assert len(again) == len(clean) and again.uid.is_unique is clean.uid.is_unique
    assert again.equals(clean)


@pytest.mark.slow
def test_curate_killed_during_the_final_write_leaves_nothing_finished_and_a_rerun_is_identical(
        curated_out, curate_args, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    for name in ("curated", "rejects"):
        shutil.rmtree(out / name)
    (out / "manifest.json").unlink()
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", *curate_args, "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if any(p.name.startswith(".publish") for p in out.iterdir()):
            break
        time.sleep(0.05)
    proc.kill()  # the driver dies mid-write
    proc.wait(timeout=60)
    assert not (out / "manifest.json").exists()
    from capfilt.pipelines.output import NotCommittedError, read_manifest
    with pytest.raises(NotCommittedError):
        read_manifest(out)
    assert not (out / "curated").exists()  # moved into place only after the counts add up

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for name, columns in (("curated", ["uid", "sha256", "caption_primary"]),
                          ("rejects", ["uid", "stage", "reason", "duplicate_of"])):
        again, clean = _sorted(out / name, columns), _sorted(curated_out / name, columns)
        assert again.equals(clean), name
    assert pq.read_table(out / "curated", columns=["uid"]).column("uid").to_pandas().is_unique


@pytest.mark.slow
def test_a_slow_resetting_5xx_server_loses_no_row_and_retryable_rows_come_back_identical(tmp_path):
    """The same 40 images fetched from plain URLs (the clean run) and from URLs where the loopback
    server answers slowly (within and beyond the timeout), with bursts of 500s, or with a reset."""
    import pandas as pd

    from capfilt.jobs.download import main as download_main
    from capfilt.world.corpus import make_web_corpus
    from capfilt.world.server import serve
    root = tmp_path / "world"
    make_web_corpus(root, n=40, seed=31, noise=0.0, duplicates=0.0, fault_rate=0.0, faults=(), variants=())
    truth = pq.read_table(root / "truth.parquet", columns=["id", "file", "caption"]).to_pandas()
    names = truth.file.str.removeprefix("img/")
    kinds = ["plain", "slow_within", "burst", "reset", "slow_beyond"]
    truth["kind"] = [kinds[i % len(kinds)] for i in range(len(truth))]
    faulty_path = {"plain": "/img/{}", "slow_within": "/f/slow/300/{}", "burst": "/f/burst/2/{}",
                   "reset": "/f/reset/{}", "slow_beyond": "/f/slow/4000/{}"}
    settings = ["--id-col", "id", "--no-progress", "--set", "download.image_size=64", "--set", "download.threads=4",
                "--set", "download.loopback_only=true", "--set", "download.retries=2", "--set", "download.timeout=1.5"]

    def run(server, paths, out, *extra):
        metadata = tmp_path / f"{out}.parquet"
        pd.DataFrame({"id": truth.id, "url": [server.base_url + p for p in paths],
                      "caption": truth.caption.map(bytes.decode)}).to_parquet(metadata)
        code = download_main(["--input", str(metadata), "--output", str(tmp_path / out), *settings,
                              "--allow-host", f"127.0.0.1:{server.port}", *extra])
        assert code in (0, None)
        data = _sorted(tmp_path / out / "data", ["uid", "sha256", "image"])
        rejects = _sorted(tmp_path / out / "rejects", ["uid", "reason", "detail"])
        return data, rejects

    with serve(root / "site") as server:
        clean, clean_rejects = run(server, "/img/" + names, "clean")
        assert len(clean) == len(truth) and clean_rejects.empty
        paths = [faulty_path[k].format(n) for k, n in zip(truth.kind, names)]
        data, rejects = run(server, paths, "faulty")
        requests = Counter(p for p, _ in server.requests)
        # every row exactly once, in data or rejects
        assert sorted([*data.uid, *rejects.uid]) == sorted(truth.id)
        by_kind = truth.set_index("id").kind
        recovered = data.uid.map(by_kind)
        assert set(recovered) == {"plain", "slow_within", "burst"}
        assert set(rejects.uid.map(by_kind)) == {"reset", "slow_beyond"}
        assert (rejects.reason == "failed_to_download").all()
        # the burst was retried inside the run (2 x 500, then the file), as was the reset (1 + 2 retries)
        for kind, attempts in (("burst", 3), ("reset", 3)):
            assert {requests[p] for p, k in zip(paths, truth.kind) if k == kind} == {attempts}, kind
        # what came back is byte for byte what the clean run got
        assert data.equals(clean[clean.uid.isin(data.uid)].reset_index(drop=True))

        # The slow rows failed on a timeout, which is retryable: a retry with a longer timeout
        # fetches them; the resetting URLs still reset. Still every row exactly once.
        data, rejects = run(server, paths, "faulty", "--retry-failed", "--set", "download.timeout=6")
    assert sorted([*data.uid, *rejects.uid]) == sorted(truth.id)
    assert set(rejects.uid.map(by_kind)) == {"reset"}
    assert data.equals(clean[clean.uid.isin(data.uid)].reset_index(drop=True))


@pytest.mark.slow
def test_20000_rows_with_a_quarter_faults_of_every_kind_lose_and_duplicate_nothing(tmp_path):
    """Conservation at size, counted from the Parquet files themselves (not from the manifest):
    every input id is in curated or rejects exactly once, through every stage of the chain. The caption
    stage runs without a captioner (num_captions=0: it still decodes and checks every image, in parts,
    with the filter's CLIP fused in its pass): the bookkeeping is the same as with five captions, at a
    fraction of the CPU (the captioner's output is checked by tests/test_caption.py)."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    from capfilt.world.corpus import FAULTS, make_web_corpus, write_metadata
    from capfilt.world.server import serve
    n = 20_000
    summary = make_web_corpus(tmp_path / "world", n=n, seed=20_000, fault_rate=0.25, slow_ms=200)
    assert sum(summary["faults"].values()) >= 0.2 * n and all(summary["faults"][f] > 0 for f in FAULTS)
    out = tmp_path / "out"
    settings = load_config(None, ["download.retries=1", "caption.num_captions=0"])
    with serve(tmp_path / "world" / "site") as server:
        metadata = write_metadata(tmp_path / "world", server.base_url)
        cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
               "--id-col", "id", "--no-progress", "--allow-host", f"127.0.0.1:{server.port}",
               "--allow-host", "127.0.0.1:1", *_as_overrides(shapes_world_settings(settings))]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    inputs = Counter(pq.read_table(metadata, columns=["id"]).column("id").to_pylist())
    ended = Counter(pq.read_table(out / "curated", columns=["uid"]).column("uid").to_pylist()
                    + pq.read_table(out / "rejects", columns=["uid"]).column("uid").to_pylist())
    assert sum(inputs.values()) == n
    assert ended == inputs, {"lost": sum((inputs - ended).values()), "duplicated": sum((ended - inputs).values())}
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert list(stages) == ["download", "caption", "filter", "dedup"]
    assert stages["caption"]["counts"]["input"] == stages["download"]["counts"]["output"] > 0.6 * n
