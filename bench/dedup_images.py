"""Image near-duplicate search at scale: the Spark stage's SemDeDup-style partitioned search against
brute force on the same embeddings (not a timed test).

    brute force   capfilt.udfs.image_dedup.near_pairs over all rows: one exact faiss range search, one process
                  (tests/test_image_dedup.py checks it against numpy's full similarity matrix)
    partitioned   capfilt.pipelines.image_dedup.candidate_pairs above exact_search_rows: k-means centroids on a
                  sample, rows assigned on executors (boundary rows to two partitions), exact search
                  within each partition; Spark local[2]

Embeddings: capfilt.world.embeddings.planted_embeddings (topic clusters, near-duplicates planted at cosines
0.93-0.999 around the threshold), stored as float16 like the filter's. Prints recall and precision
of the partitioned pairs against brute force, and both wall times. Goal: recall >= 0.98 at 50k.

    .venv/bin/python bench/dedup_images.py [--rows 50000] [--dim 512] [--partition-rows 5000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[50_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--topics", type=int, default=200)
    ap.add_argument("--dup-share", type=float, default=0.2)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--partition-rows", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from capfilt.pipelines.config import DedupSettings, SparkSettings
    from capfilt.pipelines.image_dedup import candidate_pairs
    from capfilt.pipelines.session import spark_session
    from capfilt.udfs.image_dedup import embedding_matrix, near_pairs
    from capfilt.world.embeddings import planted_embeddings

    spark = spark_session(SparkSettings(master="local[2]", shuffle_partitions=8, log_level="ERROR",
                                        conf={"spark.ui.enabled": "false"}))
    for n in args.rows:
        blobs = [row.astype("<f2").tobytes() for row in
                 planted_embeddings(n, args.dim, args.topics, args.dup_share, args.seed)]
        t = time.perf_counter()
        i, j, _ = near_pairs(embedding_matrix(blobs), args.threshold, threads=2)
        brute_s = time.perf_counter() - t
        truth = set(zip(i.tolist(), j.tolist()))

        path = f"/tmp/capfilt-bench-images-{n}.parquet"
        spark.createDataFrame([(f"u{k:07d}", b) for k, b in enumerate(blobs)], "uid string, image_embedding binary") \
            .repartition(8).write.mode("overwrite").parquet(path)
        rows = spark.read.parquet(path)
        settings = DedupSettings(image_threshold=args.threshold, exact_search_rows=1,
                                 partition_rows=args.partition_rows, kmeans_sample=min(n, 100_000))
        t = time.perf_counter()
        found = {(int(a[1:]), int(b[1:])) for a, b, _ in candidate_pairs(rows, settings, args.seed).collect()}
        spark_s = time.perf_counter() - t
        hit = len(found & truth)
        print(f"{n} rows, dim {args.dim}, threshold {args.threshold}, {-(-n // args.partition_rows)} partitions: "
              f"brute force {len(truth)} pairs in {brute_s:.1f}s; partitioned {len(found)} pairs in {spark_s:.1f}s; "
              f"recall {hit / max(len(truth), 1):.4f}, precision {hit / max(len(found), 1):.4f}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
