"""`capfilt curate` end to end vs the raw tools run back to back, side by side in one run (not a timed test).

One shapes-world web corpus (capfilt.world.corpus.make_web_corpus, every fault kind) served on 127.0.0.1; per
repeat, in alternating order (A, B / B, A / ...), each side in a fresh child process:

  A  `capfilt curate` as a user runs it (the shapes-world settings bench/quality.py gives it: 64-px
     images, the project's small models, download.retries=1; Spark local[*]); timed: the wall clock
     of the process. Its manifest's per-stage seconds are printed next to the matching raw step.
  B  the raw tools, the floor: no reject bookkeeping, no selection, no resume, no provenance:
     1. bare img2dataset, pyspark distributor (the session started the way bench/download.py does),
        same metadata (valid-UTF-8 copy: bare img2dataset fails a shard on the corpus's invalid
        caption), image_size / resize / encode / size-limit / timeout / retries / threads as curate's;
     2. caption loop: read the downloaded images, decode, the shapes captioner's generate with
        curate's num_captions, top_p, temperature, max_new_tokens, batch size (bench/capfilt.py's
        raw_caption, keeping what it generates: step 3 scores it);
     3. CLIP loop: decode, encode images and every caption (web + synthetic), cosine (bench/capfilt.py's
        raw_filter loop, the shapes CLIP, curate's filter batch size);
     4. dedup: exact sha256 in pandas, then datasketch MinHash + MinHashLSH over the web captions with
        the config's shingles, num_perm and threshold (bench/dedup.py's side_datasketch).
     Threads: Spark local[*]'s parallelism W (what curate's Spark gets), laid out as Spark lays out
     curate's model passes: W worker processes (spawned once, in step 2's time) with 1 torch thread
     each (Spark gives its Python workers OMP_NUM_THREADS=1); each takes a contiguous 1/W of the
     images. --raw-layout threads runs steps 2-3 in one process with W torch threads instead
     (bench/capfilt.py's layout); on this shared 2-core machine that layout ran the captioner several times
     slower than 1 thread (192 images, 1 vs 2 threads alternated), so it is no floor here.
     Each step timed.

Prints each timing, sum(B), the ratio A / sum(B) (goal <= 1.0), and A / (B's process wall clock).
Nothing leaves 127.0.0.0/8: every URL of the corpus is on the loopback server or malformed, curate
gets --allow-host for the server only, and B's driver refuses non-loopback connects (capfilt.net.netguard).

    SPARK_LOCAL_IP=127.0.0.1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 \\
        .venv/bin/python bench/end_to_end.py [--n 10000] [--repeats 1] [--raw-layout processes|threads]
                                             [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS_SEED = 10_001  # bench/quality.py's held-out corpus seed
RAW_STEPS = ("img2dataset", "caption", "clip", "dedup")


def bench_module(name: str):
    """A sibling bench script as a module (bench/ is no package; 'capfilt' and 'dedup' would be ambiguous)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes_config():
    """The Config curate gets: bench/quality.py's settings, parsed by the same code."""
    from capfilt.jobs.demo import shapes_world_settings
    from capfilt.pipelines.config import load_config
    return shapes_world_settings(load_config(None, ["download.retries=1"]))


# ---------------------------------------------------------------- A: capfilt curate

def run_curate(metadata: Path, out: Path, port: int, log: Path) -> dict:
    """The command bench/quality.py's curate() runs, output to a log kept for the failure report."""
    from capfilt.jobs.demo import _as_overrides
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
           "--id-col", "id", "--no-progress", "--allow-host", f"127.0.0.1:{port}", "--allow-host", "127.0.0.1:1",
           *_as_overrides(shapes_config())]
    with open(log, "w") as sink:
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise SystemExit(f"curate failed (exit {rc}) after {wall:.1f}s; last 60 lines of {log}:\n{tail}")
    manifest = json.loads((out / "manifest.json").read_text())
    download = json.loads((out / "stages" / "download" / "manifest.json").read_text())
    return {"wall_s": wall, "manifest_s": manifest["seconds"],
            "stages": {s: v["seconds"] for s, v in manifest["stages"].items()},
            "model_passes": {s: v.get("model_passes") for s, v in manifest["stages"].items()},
            "write_s": manifest.get("write", {}).get("seconds"),
            "download_timings": download.get("timings", {}),
            "downloaded": manifest["stages"]["download"]["counts"]["output"],
            "curated": manifest["counts"]["output"],
            "dedup_dropped": manifest["stages"]["dedup"]["counts"]["rejected_total"]}


# ---------------------------------------------------------------- B: the raw tools (child process)

def raw_caption_keep(images: list[bytes], ref: str, c, offset: int = 0) -> list[list[str]]:
    """bench/capfilt.py's raw_caption with every caption setting of the config, returning what it generates."""
    import io

    from PIL import Image

    from capfilt.udfs.models import load_captioner
    captioner = load_captioner(ref, "cpu")
    out: list[list[str]] = []
    for start in range(0, len(images), c.batch_size):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + c.batch_size]]
        out += captioner.generate(pil, num_captions=c.num_captions, top_p=c.top_p,
                                  seeds=list(range(offset + start, offset + start + len(pil))),
                                  max_new_tokens=c.max_new_tokens,
                                  temperature=c.temperature, batch_size=c.batch_size,
                                  min_new_tokens=c.min_new_tokens, repetition_penalty=c.repetition_penalty)
    return out


def _one_thread() -> None:
    """A raw worker process: one torch thread, as Spark's Python workers run (OMP_NUM_THREADS=1)."""
    import torch

    from capfilt.net.netguard import refuse_non_loopback
    torch.set_num_threads(1)
    refuse_non_loopback()


def _caption_chunk(task) -> list[list[str]]:
    from capfilt.udfs.models import SHAPES_CAPTIONER
    images, offset, c = task
    return raw_caption_keep(images, SHAPES_CAPTIONER, c, offset)


def raw_clip(images: list[bytes], captions: list[str], synthetic: list[list[str]], ref: str, batch: int) -> None:
    """bench/capfilt.py's raw_filter loop (decode, encode images and web + synthetic captions, cosine),
    the model load in the step's time as curate's is in its run."""
    import io

    import torch
    from PIL import Image

    from capfilt.udfs.models import load_clip
    clip = load_clip(ref, "cpu")
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
            img = clip.model.encode_image(torch.stack([clip.preprocess(p) for p in pil]), normalize=True)
            texts = [t for i in range(start, min(start + batch, len(images))) for t in [captions[i], *synthetic[i]]]
            txt = clip.model.encode_text(clip.tokenizer(texts), normalize=True)
            txt.view(len(pil), -1, txt.shape[-1]) @ img[:, :, None]


def _clip_chunk(task) -> None:
    from capfilt.udfs.models import SHAPES_CLIP
    images, web, synthetic, batch = task
    raw_clip(images, web, synthetic, SHAPES_CLIP, batch)


def chunks(n: int, parts: int) -> list[slice]:
    size = math.ceil(n / parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def raw_side(args) -> dict:
    # Imports before the clock: the floor times work, not module loading (the process wall clock,
    # measured by the parent, has both).
    import datasketch  # noqa: F401
    import img2dataset
    import open_clip  # noqa: F401
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from capfilt.net.netguard import refuse_non_loopback
    from capfilt.pipelines.session import spark_session
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP
    refuse_non_loopback()  # this process: the model loads, the Spark driver (the fetches run in Spark's workers)
    side_datasketch = bench_module("dedup").side_datasketch

    cfg = shapes_config()
    cfg.spark.log_level = "ERROR"
    d, c, f, dd = cfg.download, cfg.caption, cfg.filter, cfg.dedup
    out = Path(args.out)
    seconds: dict[str, float] = {}

    # 1. bare img2dataset (bench/download.py's call), the session started as bench/download.py does.
    start = time.perf_counter()
    spark = spark_session(cfg.spark)
    parallelism = spark.sparkContext.defaultParallelism
    img2dataset.download(
        url_list=args.metadata, input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["id"], output_format="parquet", output_folder=str(out / "img2dataset"),
        distributor="pyspark", processes_count=parallelism, thread_count=d.threads,
        number_sample_per_shard=math.ceil(args.n / parallelism), image_size=d.image_size,
        resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger, encode_quality=d.encode_quality,
        encode_format=d.encode_format, min_image_size=d.min_image_size, max_image_area=d.max_image_pixels,
        max_aspect_ratio=d.max_aspect_ratio, timeout=d.timeout, retries=d.retries, extract_exif=False,
        compute_hash="sha256", user_agent_token=d.user_agent_token, max_shard_retry=d.max_shard_retry,
        subjob_size=d.subjob_size)
    spark.stop()
    seconds["img2dataset"] = time.perf_counter() - start

    # 2. caption loop over the downloaded images (read from img2dataset's parquet shards).
    start = time.perf_counter()
    pool = None
    if args.raw_layout == "processes":  # W processes x 1 thread: Spark's layout for curate's model passes
        pool = ProcessPoolExecutor(parallelism, mp_context=get_context("spawn"), initializer=_one_thread)
        list(pool.map(time.sleep, [0] * parallelism))  # started here, as Spark starts its workers in the stage
    else:  # one process x W threads
        torch.set_num_threads(parallelism)
    table = pa.concat_tables(pq.read_table(p, columns=["id", "caption", "sha256", d.encode_format])
                             for p in sorted((out / "img2dataset").glob("*.parquet")))
    table = table.filter(table.column(d.encode_format).is_valid())
    images = table.column(d.encode_format).to_pylist()
    parts = chunks(len(images), parallelism)
    if pool is not None:
        synthetic = [caps for part in pool.map(_caption_chunk, [(images[p], p.start, c) for p in parts])
                     for caps in part]
    else:
        synthetic = raw_caption_keep(images, SHAPES_CAPTIONER, c)
    seconds["caption"] = time.perf_counter() - start

    # 3. CLIP loop: web + synthetic captions against their image.
    start = time.perf_counter()
    web = [t or "" for t in table.column("caption").to_pylist()]
    if pool is not None:
        list(pool.map(_clip_chunk, [(images[p], web[p], synthetic[p], f.batch_size) for p in parts]))
        pool.shutdown()
    else:
        raw_clip(images, web, synthetic, SHAPES_CLIP, f.batch_size)
    seconds["clip"] = time.perf_counter() - start

    # 4. exact sha256 in pandas, then datasketch MinHashLSH over the survivors' web captions.
    start = time.perf_counter()
    frame = pd.DataFrame({"uid": table.column("id").to_pylist(), "caption": table.column("caption").to_pylist(),
                          "sha256": table.column("sha256").to_pylist()})
    unique = frame[~frame.duplicated("sha256")]
    captions_file = out / "dedup-input.parquet"
    pq.write_table(pa.Table.from_pandas(unique[["uid", "caption"]], preserve_index=False), captions_file)
    side_datasketch(argparse.Namespace(data=str(captions_file), out=str(out / "clusters"), shingle=dd.shingle,
                                       ngram=dd.ngram, num_perm=dd.num_perm, threshold=dd.caption_threshold))
    clusters = pq.read_table(out / "clusters.parquet").to_pydict()
    near = sum(u != k for u, k in zip(clusters["uid"], clusters["cluster"]))
    seconds["dedup"] = time.perf_counter() - start

    threads = f"{parallelism} processes x 1 torch thread" if pool is not None else \
        f"1 process x {torch.get_num_threads()} torch threads"
    return {"seconds": seconds, "parallelism": parallelism, "layout": threads,
            "downloaded": len(images), "exact_dropped": len(frame) - len(unique), "near_dropped": near}


def run_raw(metadata: Path, out: Path, n: int, layout: str, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--metadata", str(metadata),
           "--out", str(out), "--n", str(n), "--raw-layout", layout]
    with open(log, "w") as sink:
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    if rc or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise SystemExit(f"raw side failed (exit {rc}) after {wall:.1f}s; last 60 lines of {log}:\n{tail}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


# ---------------------------------------------------------------- the parent

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="rows in the web corpus")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side, order alternating")
    ap.add_argument("--raw-layout", choices=["processes", "threads"], default="processes",
                    help="raw steps 2-3: W processes x 1 torch thread (Spark's layout), or 1 process x W threads")
    ap.add_argument("--work", default=None, help="folder for the corpus and outputs (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--metadata", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(raw_side(args)), flush=True)
        return

    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve
    valid_utf8_copy = bench_module("download").valid_utf8_copy

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = shapes_config()
    start = time.perf_counter()
    make_web_corpus(work / "corpus", n=args.n, seed=CORPUS_SEED, slow_ms=200, overwrite=True)
    print(f"corpus: {args.n} rows (seed {CORPUS_SEED}) in {time.perf_counter() - start:.0f}s -> {work / 'corpus'}; "
          f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"settings: image_size {cfg.download.image_size} {cfg.download.resize_mode} {cfg.download.encode_format} "
          f"q{cfg.download.encode_quality}, {cfg.download.threads} download threads, retries {cfg.download.retries}; "
          f"{cfg.caption.num_captions} captions top_p {cfg.caption.top_p} max_new_tokens {cfg.caption.max_new_tokens} "
          f"batch {cfg.caption.batch_size}; CLIP batch {cfg.filter.batch_size}; dedup {cfg.dedup.shingle} "
          f"{cfg.dedup.ngram}-grams num_perm {cfg.dedup.num_perm} threshold {cfg.dedup.caption_threshold}", flush=True)
    runs: list[tuple[dict, dict]] = []
    try:
        with serve(work / "corpus" / "site") as server:
            metadata = write_metadata(work / "corpus", server.base_url)
            raw_metadata = valid_utf8_copy(metadata, [server.base_url])
            for i in range(args.repeats):
                result: dict[str, dict] = {}
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    out = work / f"{side}{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    if side == "A":
                        result["A"] = run_curate(metadata, out, server.port, work / f"curate{i}.log")
                    else:
                        result["B"] = run_raw(raw_metadata, out, args.n, args.raw_layout, work / f"raw{i}.log")
                a, b = result["A"], result["B"]
                steps = sum(b["seconds"].values())
                print(f"repeat {i} ({'curate first' if i % 2 == 0 else 'raw first'}): curate {a['wall_s']:.1f}s; "
                      f"raw steps {steps:.1f}s (process {b['wall_s']:.1f}s); ratio {a['wall_s'] / steps:.3f}; "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
                runs.append((a, b))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(runs, args)


def report(runs: list[tuple[dict, dict]], args) -> None:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    a_runs, b_runs = [a for a, _ in runs], [b for _, b in runs]
    raw = {s: med([b["seconds"][s] for b in b_runs]) for s in RAW_STEPS}
    stage = {s: med([a["stages"].get(s) for a in a_runs]) for s in ("download", "caption", "filter", "dedup")}
    write = med([a["write_s"] for a in a_runs])
    a_wall, a_manifest = med([a["wall_s"] for a in a_runs]), med([a["manifest_s"] for a in a_runs])
    b_sum = med([sum(b["seconds"].values()) for b in b_runs])
    b_wall = med([b["wall_s"] for b in b_runs])
    a0, b0 = a_runs[-1], b_runs[-1]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in a0["download_timings"].items())
    fused = a0["model_passes"].get("caption")
    of = f"median of {len(runs)}" if len(runs) > 1 else "one run"

    print(f"\nrows={args.n}  Spark local[*] parallelism {b0['parallelism']}; raw steps 2-3: {b0['layout']}; "
          f"seconds, {of}")
    print(f"  downloaded: curate {a0['downloaded']}, img2dataset {b0['downloaded']} (curate also rejects empty "
          f"captions and duplicate ids);  dedup dropped: curate {a0['dedup_dropped']}, raw "
          f"{b0['exact_dropped']} exact + {b0['near_dropped']} near-duplicate captions")
    print(f"\n  {'raw step (B)':<38} {'s':>8}   {'curate (A manifest)':<28} {'s':>8}")
    rows = [("1 img2dataset (pyspark distributor)", raw["img2dataset"], "download", stage["download"]),
            ("2 caption loop (decode + generate)", raw["caption"],
             "caption" + (" (fused: + CLIP)" if fused and len(fused) > 1 else ""), stage["caption"]),
            ("3 CLIP loop (decode + encode, cosine)", raw["clip"], "filter", stage["filter"]),
            ("  2 + 3", raw["caption"] + raw["clip"], "caption + filter", stage["caption"] + stage["filter"]),
            ("4 sha256 (pandas) + datasketch LSH", raw["dedup"], "dedup (+ faiss image near-dups)", stage["dedup"]),
            ("", None, "write (curated, rejects, manifest)", write),
            ("sum(B)", b_sum, "manifest seconds", a_manifest),
            ("B process (imports, start-up)", b_wall - b_sum, "A process - manifest", a_wall - a_manifest),
            ("B process wall clock", b_wall, "A: curate process wall clock", a_wall)]
    for left, lv, right, rv in rows:
        lv_s = f"{lv:8.1f}" if lv is not None else " " * 8
        print(f"  {left:<38} {lv_s}   {right:<28} {rv:8.1f}")
    print(f"  curate download phases: {timings};  model passes: {a0['model_passes']}")
    print(f"\nratio A / sum(B)               = {a_wall / b_sum:.3f}  (goal <= 1.0)")
    print(f"ratio A / B process wall clock = {a_wall / b_wall:.3f}")
    if len(runs) > 1:
        print("per repeat A / sum(B): " + ", ".join(f"{a['wall_s'] / sum(b['seconds'].values()):.3f}"
                                                   for a, b in runs))


if __name__ == "__main__":
    main()
