"""Driver memory as rows grow: `capfilt curate` over shapes-world corpora of each size (not a timed test).

For each size: generate a corpus (every fault kind), serve it on 127.0.0.1, run the whole chain in a
child process (Spark local[2], the project's small models) and report the child's peak RSS (VmHWM:
the driver Python), the driver JVM's (in local mode it is the executor too, so it holds Spark's
caches and shuffle buffers) and the wall time, plus the conservation check from the Parquet files
themselves (every input id in curated or rejects exactly once). Goal: driver Python peak at the
largest size <= 1.2x the smallest.

    .venv/bin/python bench/scale.py [--sizes 10000 100000] [--fault-rate 0.04] [--work /tmp/capfilt-bench-scale]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_dedup", ROOT / "bench" / "dedup.py")
_dedup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dedup)
vm_hwm_mb, descendants = _dedup.vm_hwm_mb, _dedup.descendants


def run_size(n: int, work: Path, fault_rate: float) -> dict:
    import pyarrow.parquet as pq

    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve

    corpus, out = work / f"world-{n}-{fault_rate}", work / f"out-{n}-{fault_rate}"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=n, seed=n, slow_ms=200, fault_rate=fault_rate, overwrite=True)
    with serve(corpus / "site") as server:
        metadata = write_metadata(corpus, server.base_url)
        settings = _as_overrides(shapes_world_settings(load_config(None, ["download.retries=1"])))
        cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
               "--id-col", "id", "--overwrite", "--no-progress", "--allow-host", f"127.0.0.1:{server.port}",
               "--allow-host", "127.0.0.1:1", *settings]
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks = collections.defaultdict(float)

        def sample():  # the JVM's VmHWM is gone with it: sample while it lives
            while proc.poll() is None:
                peaks["python"] = max(peaks["python"], vm_hwm_mb(proc.pid))
                for pid in descendants(proc.pid):
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")[:200]
                    except OSError:
                        continue  # exited since it was listed
                    if "java" in cmdline:
                        peaks["jvm"] = max(peaks["jvm"], vm_hwm_mb(pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log, _ = proc.communicate()
        sampler.join()
        seconds = time.time() - started
    if proc.returncode:
        raise SystemExit(f"curate failed at {n} rows:\n{log[-3000:]}")
    inputs = collections.Counter(pq.read_table(metadata, columns=["id"]).column("id").to_pylist())
    ended = collections.Counter(pq.read_table(out / "curated", columns=["uid"]).column("uid").to_pylist()
                                + pq.read_table(out / "rejects", columns=["uid"]).column("uid").to_pylist())
    manifest = json.loads((out / "manifest.json").read_text())
    faults = pq.read_table(corpus / "truth.parquet", columns=["fault"]).column("fault").drop_null()
    return {"rows": n, "fault_rows": len(faults), "fault_kinds": len(set(faults.to_pylist())), "seconds": round(seconds, 1), "driver_python_peak_mb": round(peaks["python"]),
            "jvm_peak_mb": round(peaks["jvm"]), "curated": manifest["counts"]["output"],
            "rejected": manifest["counts"]["rejected_total"],
            "lost": sum((inputs - ended).values()), "duplicated": sum((ended - inputs).values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--fault-rate", type=float, default=0.04, help="share of rows with a planted fault")
    ap.add_argument("--work", default="/tmp/capfilt-bench-scale")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        result = run_size(n, work, args.fault_rate)
        results.append(result)
        print(json.dumps(result), flush=True)
    first, last = results[0], results[-1]
    print(f"driver Python peak {last['driver_python_peak_mb']} MB at {last['rows']} rows vs "
          f"{first['driver_python_peak_mb']} MB at {first['rows']}: ratio "
          f"{last['driver_python_peak_mb'] / max(first['driver_python_peak_mb'], 1):.2f} (goal <= 1.2); "
          f"JVM {last['jvm_peak_mb']} vs {first['jvm_peak_mb']} MB; rows lost {sum(r['lost'] for r in results)}, "
          f"duplicated {sum(r['duplicated'] for r in results)}")


if __name__ == "__main__":
    main()
