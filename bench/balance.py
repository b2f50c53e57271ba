"""Concept balancing at MetaCLIP's scale (not a timed test): the matcher, then the stage on local[2].

match   100,000 captions x 500,000 entries. Entries from Debian's WordNet (every lemma of index.noun/verb/
        adj/adv; `apt-get download wordnet-base`, then `dpkg-deb -x`) and word list (wamerican's
        /usr/share/dict/words), filled to the size with the most frequent word pairs of WordNet's glosses
        (MetaCLIP adds Wikipedia bigrams the same way); captions: WordNet's glosses and example sentences.
        Without those files both are generated (Zipf words) and the output says so. Prints the index's
        build time and size, the index's rows/s on one core over every caption, MetaCLIP's loop
        (udfs/balance.py: substring_matches, one `in` per entry) timed on a sample, the ratio, and checks
        both give the same ids on every sampled caption.
spark   the balance stage's split (pipelines/balance.py) on N generated rows (captions naming one or two
        entries drawn from a Zipf law over the shuffled entries), written to Parquet as the runner writes it, in a
        child process: wall time, driver peak RSS (Python and JVM, VmHWM), rows kept against the sum of the
        rows' keep probabilities (the t/count expectation).

    .venv/bin/python bench/balance.py [--entries 500000] [--captions 100000] [--sample 300]
                                      [--wordnet /usr/share/wordnet] [--words /usr/share/dict/words]
                                      [--spark-rows 1000000] [--t 2000] [--work /tmp/capfilt-bench-balance]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.dedup import spark_memory, peak_rss_mb  # noqa: E402  (shared VmHWM helpers)


# ---------------------------------------------------------------- data

def wordnet_sources(wordnet: Path, words: Path, n_entries: int, n_captions: int):
    """(entries, captions, where they came from) from WordNet + a word list, or None without them."""
    if not (wordnet / "index.noun").exists() or not words.exists():
        return None
    lemmas = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wordnet / f"index.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line and not line.startswith(" "):
                lemmas.append(line.split(" ", 1)[0].replace("_", " "))
    listed = words.read_text(encoding="utf-8", errors="replace").splitlines()
    captions, pairs = [], Counter()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wordnet / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1].strip()
            parts = [p.strip().strip('"') for p in gloss.split(";")]
            captions += [p for p in parts if p]
            for p in parts:
                tokens = re.findall(r"[a-z][a-z'-]*", p.lower())
                pairs.update(zip(tokens, tokens[1:]))
    from capfilt.udfs.balance import prepare_entries
    entries, _ = prepare_entries(lemmas + listed)
    known = set(entries)
    for (a, b), _ in pairs.most_common():
        if len(entries) >= n_entries:
            break
        if f"{a} {b}" not in known:
            entries.append(f"{a} {b}")
            known.add(f"{a} {b}")
    random.Random(0).shuffle(captions)
    where = f"WordNet ({wordnet}) lemmas + {words} + WordNet gloss bigrams; captions: WordNet glosses and examples"
    return entries[:n_entries], captions[:n_captions], where


def generated_sources(n_entries: int, n_captions: int):
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(60_000)]
    zipf = [1 / (i + 1) for i in range(len(vocabulary))]
    entries = set()
    while len(entries) < n_entries:
        entries.add(" ".join(rng.choices(vocabulary, zipf, k=rng.choice([1, 1, 1, 2, 2, 3]))))
    captions = [" ".join(rng.choices(vocabulary, zipf, k=rng.randint(5, 25))) + rng.choice([".", ",", ""])
                for _ in range(n_captions)]
    return sorted(entries), captions, "generated (no WordNet / word list here): Zipf words"


# ---------------------------------------------------------------- match

def bench_match(args) -> dict:
    from capfilt.udfs.balance import EntryIndex, prepare_entries, substring_matches
    found = wordnet_sources(Path(args.wordnet), Path(args.words), args.entries, args.captions)
    entries, captions, where = found or generated_sources(args.entries, args.captions)
    entries, _ = prepare_entries(entries)
    index = EntryIndex(entries)
    started = time.perf_counter()
    matched = [index.match(c) for c in captions]
    fast_s = time.perf_counter() - started
    sample = random.Random(1).sample(range(len(captions)), min(args.sample, len(captions)))
    spaced = [f" {e} " for e in entries]
    started = time.perf_counter()
    reference = {i: substring_matches(captions[i], spaced) for i in sample}
    slow_s = time.perf_counter() - started
    differ = [i for i in sample if reference[i] != matched[i]]
    per_fast, per_slow = fast_s / len(captions), slow_s / len(sample)
    return {"source": where, "entries": len(entries), "captions": len(captions),
            "index_build_s": round(index.build_seconds, 3), "index_mb": round(index.size_bytes() / 2**20, 1),
            "index_rows_per_s_per_core": round(len(captions) / fast_s), "index_s": round(fast_s, 2),
            "loop_sample": len(sample), "loop_s": round(slow_s, 2), "loop_rows_per_s_per_core": round(1 / per_slow, 2),
            "speedup": round(per_slow / per_fast), "mean_entries_per_caption": round(sum(map(len, matched)) / len(matched), 2),
            "captions_with_a_match": round(sum(bool(m) for m in matched) / len(matched), 4),
            "sample_identical": not differ, "sample_differing": differ[:5]}


# ---------------------------------------------------------------- spark (a child process)

def make_rows(spark, entries_file: str, n: int, folder: str, seed: int = 0) -> None:
    """n rows whose caption names one or two entries drawn from a Zipf law (exponent 1) over the entries."""
    import pandas as pd
    from pyspark.sql import types as T
    entries = Path(entries_file).read_text().splitlines()
    shipped = spark.sparkContext.broadcast(entries)
    schema = T.StructType([T.StructField("uid", T.StringType()), T.StructField("url", T.StringType()),
                           T.StructField("caption", T.StringType()), T.StructField("caption_primary", T.StringType()),
                           T.StructField("candidates", T.ArrayType(T.StructType([
                               T.StructField("text", T.StringType()), T.StructField("kept", T.BooleanType())])))])

    def generate(batches):
        import numpy as np
        names = shipped.value
        for batch in batches:
            ids = batch["id"].to_numpy()
            rng = np.random.default_rng(seed + int(ids[0]))
            # Zipf over ranks: rank = floor(K ** u) - 1 with u uniform gives P(rank) ~ 1 / rank
            first = (len(names) ** rng.random(len(ids))).astype(np.int64) - 1
            second = (len(names) ** rng.random(len(ids))).astype(np.int64) - 1
            two = rng.random(len(ids)) < 0.5
            captions = [names[a] + (f", {names[b]}" if t else "") for a, b, t in zip(first, second, two)]
            yield pd.DataFrame({"uid": [f"{i:09d}" for i in ids], "url": [f"http://127.0.0.1:1/{i}.jpg" for i in ids],
                                "caption": captions, "caption_primary": captions,
                                "candidates": [[{"text": c, "kept": True}] for c in captions]})
    spark.range(n, numPartitions=8).mapInPandas(generate, schema).write.mode("overwrite").parquet(folder)


def side_spark(args) -> dict:
    from capfilt.pipelines.config import BalanceSettings, Config, SparkSettings
    from capfilt.pipelines.balance import split
    from capfilt.pipelines.session import spark_session
    from capfilt.pipelines.stage import Context
    spark = spark_session(SparkSettings(master="local[2]", app_name="bench-balance", log_level="ERROR",
                                        conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}))
    cfg = Config(balance=BalanceSettings(entries=args.entries_file, t=args.t))
    rows = spark.read.parquet(args.rows)
    started = time.perf_counter()
    result = split(rows, cfg, Context(chain=None, rows=args.spark_rows, workdir=args.work))
    result.records.write.mode("overwrite").parquet(f"{args.work}/kept")
    result.rejects.write.mode("overwrite").parquet(f"{args.work}/rejects")
    wall = time.perf_counter() - started
    kept = spark.read.parquet(f"{args.work}/kept").count()
    dropped = spark.read.parquet(f"{args.work}/rejects").count()
    report = result.report
    out = {"rows": args.spark_rows, "t": args.t, "wall_s": round(wall, 1), "rows_per_s": round(args.spark_rows / wall),
           "kept": kept, "rejected": dropped, "conserved": kept + dropped == args.spark_rows,
           "expected_kept": report["expected_kept"], "kept_vs_expected": round(kept / report["expected_kept"] - 1, 5),
           "entries_matched": report["entries_matched"], "entries_capped": report["entries_capped"],
           "head": report["head"][:3], "driver_python_peak_mb": round(peak_rss_mb(), 1),
           **{k: round(v, 1) for k, v in spark_memory(spark).items()}}
    spark.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=300, help="captions MetaCLIP's loop is timed and checked on")
    parser.add_argument("--wordnet", default="/usr/share/wordnet")
    parser.add_argument("--words", default="/usr/share/dict/words")
    parser.add_argument("--spark-rows", type=int, default=1_000_000, help="0: skip the Spark run")
    parser.add_argument("--t", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/capfilt-bench-balance")
    parser.add_argument("--side", choices=["spark"], help=argparse.SUPPRESS)
    parser.add_argument("--entries-file", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "spark":
        print(json.dumps(side_spark(args)))
        return 0
    match = bench_match(args)
    print(json.dumps({"match": match}, indent=1), flush=True)
    if not args.spark_rows:
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    found = wordnet_sources(Path(args.wordnet), Path(args.words), args.entries, 0)
    entries = (found or generated_sources(args.entries, 0))[0]
    random.Random(2).shuffle(entries)  # the Zipf law's head: any entries, not the alphabet's first
    (work / "entries.txt").write_text("\n".join(entries) + "\n")
    rows = work / f"rows-{args.spark_rows}"
    if not (rows / "_SUCCESS").exists():
        from capfilt.pipelines.config import SparkSettings
        from capfilt.pipelines.session import spark_session
        spark = spark_session(SparkSettings(master="local[2]", app_name="bench-balance-rows", log_level="ERROR"))
        make_rows(spark, str(work / "entries.txt"), args.spark_rows, str(rows))
        spark.stop()
    child = subprocess.run([sys.executable, __file__, "--side", "spark", "--entries-file", str(work / "entries.txt"),
                            "--rows", str(rows), "--spark-rows", str(args.spark_rows), "--t", str(args.t),
                            "--work", str(work)], capture_output=True, text=True)
    if child.returncode:
        print(child.stderr[-3000:], file=sys.stderr)
        return child.returncode
    print(json.dumps({"spark": json.loads(child.stdout.strip().splitlines()[-1])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
