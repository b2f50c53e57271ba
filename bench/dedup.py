"""Near-duplicate caption dedup: the Spark stage vs datasketch single-process vs Spark MLlib's
MinHashLSH, on the same generated captions with the same parameters (not a timed test).

Per size, each side runs once in its own subprocess (so peak memory figures do not mix), from the
captions' parquet on disk to the clusters (uid, cluster) written as parquet:

    spark       capfilt.pipelines.caption_dedup.caption_clusters in Spark local[2]
    datasketch  MinHash + MinHashLSH (same shingles, num_perm, seed, threshold) + a union-find over
                the buckets, one Python process
    mllib       pyspark.ml.feature.MinHashLSH (HashingTF of the same shingles, approxSimilarityJoin at
                Jaccard distance < 1 - threshold) + the same components; OR of single hashes, so its
                pairs differ by design; run at the sizes given, capped in time

Prints wall time (session start apart), peak RSS of the driver Python process and, for Spark, of
the driver JVM (VmHWM), and checks that the Spark clusters equal datasketch's row for row.
The generated corpus: free text (Zipf words), templates, near-duplicates planted by word edits and
by case/spacing, exact copies, boilerplate alt-texts shared by ~1.5% of rows, short and empty ones.

    .venv/bin/python bench/dedup.py [--sizes 100000 1000000] [--mllib-sizes 10000 100000 300000]
                                    [--mllib-timeout 300] [--work /tmp/capfilt-bench-dedup]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd  # module level: the pandas UDF's type hints are resolved in these globals

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOILERPLATE = ["Click to enlarge", "image may contain: outdoor", "Product image 1 of 5", "No description available",
               "Photo courtesy of the artist", "thumbnail", "Stock Photo - Royalty Free", "view larger image",
               "Loading...", "Placeholder image for this item"]
TEMPLATES = ["a photo of a {0} {1} in the {2}", "{0} {1} {2} for sale - free shipping on {3}",
             "stock image: {0} and {1} isolated on white background", "{0} {1} wallpaper hd 1920x1080 {2}",
             "vintage {0} {1} poster, {2} edition ({3})", "how to draw a {0} {1}: step by step {2} tutorial"]


# ---------------------------------------------------------------- data

def generate(folder: Path, n: int, seed: int = 1, chunk: int = 100_000) -> Path:
    """n captions with planted near-duplicates, as part-*.parquet of (uid, caption); reused if there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "_done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "gu", "zo", "ri", "fa", "be", "on"]
    vocab = np.array(sorted({"".join(rng.choice(syllables, rng.integers(2, 5))) for _ in range(40_000)}))
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    uids = rng.permutation(n)
    for part, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        kind = rng.choice(7, m, p=[0.66, 0.08, 0.12, 0.05, 0.015, 0.07, 0.005])
        words = vocab[rng.choice(len(vocab), (m, 24), p=zipf)]
        lengths = rng.integers(4, 21, m)
        captions: list[str | None] = []
        for i in range(m):
            k = kind[i]
            if k == 0 or (k in (2, 3) and i < 100):  # free text (an edit needs an earlier row)
                captions.append(" ".join(words[i, :lengths[i]]))
            elif k == 1:
                captions.append(TEMPLATES[i % len(TEMPLATES)].format(*words[i, :4]))
            elif k == 2:  # near-duplicate of an earlier row: word edits, or case and spacing only
                source = captions[int(rng.integers(0, i))] or "x"
                toks = source.split() or ["x"]
                if rng.random() < 0.3:
                    captions.append(source.upper() if rng.random() < 0.5 else "  " + source.replace(" ", " \t ", 1))
                    continue
                for _ in range(int(rng.choice([1, 1, 2]))):
                    j, op = int(rng.integers(0, len(toks))), rng.random()
                    if op < 0.4:
                        toks[j] = words[i, j % 24]
                    elif op < 0.7:
                        toks.insert(j, words[i, (j + 7) % 24])
                    elif len(toks) > 1:
                        del toks[j]
                captions.append(" ".join(toks))
            elif k == 3:
                captions.append(captions[int(rng.integers(0, i))])
            elif k == 4:  # boilerplate alt-text, the first one by far the most common
                captions.append(BOILERPLATE[min(int(rng.zipf(1.6)) - 1, len(BOILERPLATE) - 1)])
            elif k == 5:
                captions.append(" ".join(words[i, :1 + i % 2]))
            else:
                captions.append([None, "", "   "][i % 3])
        ids = [f"u{u:09d}" for u in uids[start:start + m]]
        pq.write_table(pa.table({"uid": ids, "caption": pa.array(captions, pa.string())}),
                       folder / f"part-{part:05d}.parquet")
    done.touch()
    return folder


# ---------------------------------------------------------------- the sides (each in a child process)

def peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the forked parent
    # across exec, so a child would report the bench parent's memory as its own.
    return vm_hwm_mb(os.getpid())


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0  # gone, or a zombie


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def settings_from(args):
    from capfilt.pipelines.config import DedupSettings
    return DedupSettings(shingle=args.shingle, ngram=args.ngram, num_perm=args.num_perm,
                         caption_threshold=args.threshold)


def session(args):
    from capfilt.pipelines.config import SparkSettings
    from capfilt.pipelines.session import spark_session
    return spark_session(SparkSettings(master="local[2]", app_name="bench-dedup", driver_memory=args.driver_memory,
                                       shuffle_partitions=args.shuffle_partitions, log_level="ERROR",
                                       arrow_batch_size=args.arrow_batch_size,
                                       conf={"spark.ui.enabled": "false",
                                             "spark.ui.showConsoleProgress": "false"}))


def spark_memory(spark) -> dict:
    jvm = int(spark._jvm.java.lang.ProcessHandle.current().pid())
    return {"jvm_peak_mb": vm_hwm_mb(jvm),
            "python_workers_peak_mb": max([vm_hwm_mb(p) for p in descendants(jvm)], default=0.0)}


def side_spark(args) -> dict:
    from capfilt.pipelines.caption_dedup import caption_clusters
    start = time.perf_counter()
    spark = session(args)
    ready = time.perf_counter()
    df = spark.read.parquet(args.data)
    caption_clusters(df, settings_from(args)).write.mode("overwrite").parquet(args.out)
    end = time.perf_counter()
    result = {"session_s": ready - start, "wall_s": end - ready, **spark_memory(spark)}
    spark.stop()
    return result


def side_datasketch(args) -> dict:
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    from capfilt.udfs.minhash import DEFAULT_SEED, shingles
    start = time.perf_counter()
    table = ds.dataset(args.data, format="parquet").to_table(columns=["uid", "caption"])
    uids, captions = table.column("uid").to_pylist(), table.column("caption").to_pylist()
    del table
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    template = MinHash(num_perm=args.num_perm, seed=DEFAULT_SEED)
    with lsh.insertion_session() as session_:
        for uid, caption in zip(uids, captions):
            grams = shingles(caption, args.shingle, args.ngram)
            if grams:  # the stage's rule: no shingles, no signature
                m = template.copy()
                m.update_batch([g.encode("utf-8") for g in grams])
                session_.insert(uid, m, check_duplication=False)
    # Union-find over the buckets: the same components as over all query pairs, linear in entries.
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for table_ in lsh.hashtables:
        for key in table_.keys():
            members = table_.get(key)
            if len(members) > 1:
                roots = {find(u) for u in members}
                smallest = min(roots)
                for r in roots:
                    parent[r] = smallest
    nodes = list(parent)
    clusters = [find(u) for u in nodes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": nodes, "cluster": clusters}), Path(args.out).with_suffix(".parquet"))
    end = time.perf_counter()
    return {"wall_s": end - start, "bands_rows": [lsh.b, lsh.r]}


def side_mllib(args) -> dict:
    from pyspark.ml.feature import HashingTF, MinHashLSH
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from capfilt.pipelines.components import connected_components

    kind, n = args.shingle, args.ngram
    start = time.perf_counter()
    spark = session(args)
    ready = time.perf_counter()

    @pandas_udf("array<string>")  # the same shingles as the other two sides
    def shingle_udf(captions: pd.Series) -> pd.Series:
        from capfilt.udfs.minhash import shingles
        return pd.Series([shingles(c, kind, n) for c in captions])

    df = spark.read.parquet(args.data).select("uid", shingle_udf("caption").alias("grams"))
    df = df.filter(F.size("grams") > 0)
    features = HashingTF(inputCol="grams", outputCol="features", numFeatures=1 << 24, binary=True).transform(df)
    model = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=args.mllib_tables,
                       seed=1).fit(features)
    pairs = model.approxSimilarityJoin(features, features, 1.0 - args.threshold, distCol="distance")
    edges = pairs.select(F.col("datasetA.uid").alias("src"), F.col("datasetB.uid").alias("dst")).filter("src < dst")
    components = connected_components(edges)
    components.select(F.col("node").alias("uid"), F.col("component").alias("cluster")) \
        .write.mode("overwrite").parquet(args.out)
    end = time.perf_counter()
    result = {"session_s": ready - start, "wall_s": end - ready, **spark_memory(spark)}
    spark.stop()
    return result


def child(args) -> None:
    result = {"spark": side_spark, "datasketch": side_datasketch, "mllib": side_mllib}[args.child](args)
    result["driver_python_peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent

def run_side(name: str, data: Path, out: Path, args, timeout: float | None = None) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--data", str(data), "--out", str(out),
           "--shingle", args.shingle, "--ngram", str(args.ngram), "--num-perm", str(args.num_perm),
           "--threshold", str(args.threshold), "--shuffle-partitions", str(args.shuffle_partitions),
           "--arrow-batch-size", str(args.arrow_batch_size), "--driver-memory", args.driver_memory,
           "--mllib-tables", str(args.mllib_tables)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child and the JVM it started, nothing else
        proc.communicate()
        print(f"  {name}: stopped after {timeout:.0f} s", flush=True)
        return None
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  {name} failed (exit {proc.returncode}):\n{output[-3000:]}", flush=True)
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    driver = result["driver_python_peak_mb"] + result.get("jvm_peak_mb", 0.0)
    extra = (f", session start {result['session_s']:.1f} s; driver Python {result['driver_python_peak_mb']:.0f} MB"
             f" + JVM {result['jvm_peak_mb']:.0f} MB; Python workers {result['python_workers_peak_mb']:.0f} MB each"
             if "jvm_peak_mb" in result else "")
    print(f"  {name:<10} {result['wall_s']:8.1f} s, peak driver memory {driver:6.0f} MB{extra}", flush=True)
    result["driver_peak_mb"] = driver
    return result


def clusters_of(path: Path) -> dict[str, str]:
    import pyarrow.dataset as ds
    table = ds.dataset(path, format="parquet").to_table()
    return dict(zip(table.column("uid").to_pylist(), table.column("cluster").to_pylist()))


def compare(spark_out: Path, ds_out: Path, n: int) -> bool:
    spark, ref = clusters_of(spark_out), clusters_of(ds_out.with_suffix(".parquet"))
    dropped = sum(1 for u, c in ref.items() if u != c)
    same = spark == ref
    print(f"  clusters: datasketch {len(set(ref.values()))} clusters over {len(ref)} rows, {dropped} rows dropped "
          f"({dropped / n:.1%}); Spark identical: {same}", flush=True)
    if not same:
        only_spark = set(spark.items()) - set(ref.items())
        only_ref = set(ref.items()) - set(spark.items())
        print(f"  DIFFERENT: {len(only_spark)} (uid, cluster) only in Spark, {len(only_ref)} only in datasketch")
    return same


def compare_mllib(mllib_out: Path, ds_out: Path) -> bool:
    mllib, ref = clusters_of(mllib_out), clusters_of(ds_out.with_suffix(".parquet"))
    a = {u for u, c in mllib.items() if u != c}
    b = {u for u, c in ref.items() if u != c}
    print(f"  mllib dropped {len(a)} rows, datasketch {len(b)}; in both {len(a & b)} (MLlib keeps exact-Jaccard pairs "
          f"among OR-of-single-hash candidates: not the same result by design)", flush=True)
    return mllib == ref


def images_hook(args) -> None:
    script = ROOT / "bench" / "dedup_images.py"
    if args.skip_images:
        return
    print("\nimage dedup: bench/dedup_images.py", flush=True)
    subprocess.run([sys.executable, str(script), *args.images_args], cwd=ROOT, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--mllib-sizes", type=int, nargs="*", default=[10_000, 100_000, 300_000],
                    help="MLlib sizes, tried in order until one does not finish within --mllib-timeout")
    ap.add_argument("--mllib-timeout", type=float, default=300)
    ap.add_argument("--mllib-tables", type=int, default=0, help="MLlib numHashTables (0: as many as LSH bands)")
    ap.add_argument("--work", default="/tmp/capfilt-bench-dedup", help="generated data and outputs (data reused)")
    ap.add_argument("--shingle", default="word")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--shuffle-partitions", type=int, default=8)
    ap.add_argument("--arrow-batch-size", type=int, default=512)
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--skip-images", action="store_true")
    ap.add_argument("--images-args", nargs="*", default=[], help="arguments passed to bench/dedup_images.py")
    ap.add_argument("--child", choices=["spark", "datasketch", "mllib"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from capfilt.udfs.minhash import lsh_params
    bands, rows = lsh_params(args.threshold, args.num_perm)
    args.mllib_tables = args.mllib_tables or bands
    work = Path(args.work)
    print(f"captions: {args.shingle} {args.ngram}-grams, num_perm {args.num_perm}, threshold {args.threshold} -> "
          f"{bands} bands x {rows} rows; Spark local[2], {args.shuffle_partitions} shuffle partitions; "
          f"{os.cpu_count()} cores", flush=True)
    summary: list[tuple] = []  # (rows, side, result or None, identical to datasketch)

    def both(n: int, data: Path, out: Path) -> None:
        ref = run_side("datasketch", data, out / "datasketch", args)
        ours = run_side("spark", data, out / "spark", args)
        same = ref is not None and ours is not None and compare(out / "spark", out / "datasketch", n)
        summary.extend([(n, "datasketch", ref, None), (n, "spark", ours, same)])

    for n in args.sizes:
        start = time.perf_counter()
        data = generate(work / f"captions-{n}", n)
        print(f"\n{n:,} captions ({data}, ready in {time.perf_counter() - start:.0f} s)", flush=True)
        both(n, data, work / f"out-{n}")
    for n in args.mllib_sizes:
        data = generate(work / f"captions-{n}", n)
        out = work / f"out-{n}"
        print(f"\n{n:,} captions, with MLlib MinHashLSH (numHashTables {args.mllib_tables}, "
              f"stopped after {args.mllib_timeout:.0f} s)", flush=True)
        if n not in args.sizes:
            both(n, data, out)
        result = run_side("mllib", data, out / "mllib", args, timeout=args.mllib_timeout)
        summary.append((n, "mllib", result, result and compare_mllib(out / "mllib", out / "datasketch")))
        if result is None:
            break

    print(f"\n{'rows':>10} {'side':<11} {'wall s':>8} {'driver peak MB':>15}  same clusters as datasketch")
    for n, side, result, same in sorted(summary, key=lambda r: (r[0], r[1])):
        wall = f"{result['wall_s']:8.1f}" if result else f"{'> cap' if side == 'mllib' else 'failed':>8}"
        memory = f"{result['driver_peak_mb']:15.0f}" if result else f"{'':>15}"
        verdict = {None: "", True: "yes", False: "no"}[same] if side != "datasketch" else "(reference)"
        print(f"{n:>10,} {side:<11} {wall} {memory}  {verdict}")
    images_hook(args)


if __name__ == "__main__":
    main()
