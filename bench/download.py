"""Download stage vs bare img2dataset, side by side in one run (not a timed test).

Same shapes-world corpus on the same loopback server, same SparkSession, same shard size, threads,
resize and format; runs alternate (bare, capfilt, bare, capfilt, ...) so machine noise hits both.
Prints rows/s of each and the ratio capfilt / bare (goal >= 0.95).

Web sizes: `--image-size 1024` (or a range, 512-2048) renders the corpus at that size, with JPEG
quality drawn from 60-95, and stores at `--store-size` (256, capfilt's default). capfilt then decodes
large JPEGs at reduced size (download.reduced_decode); a third arm runs capfilt with it off, and the
stored images of capfilt and img2dataset are compared (PSNR per image, matched by id).

Politeness: `--hosts 50` serves the corpus from 50 loopback hosts (127.0.0.2, ...; rows spread across
them) and adds an arm "capfilt, polite": robots.txt fetched from every host and per-host limits
(--polite-rate 1000 --polite-connections 64 by default: limits that never bind; 10 and 6 are capfilt's
defaults), against the plain "capfilt" arm with politeness off (goal >= 0.90 of img2dataset).

HTTPS: `--tls` serves every host with a certificate from the world's test CA (world/tls.py), kept alive
(HTTP/1.1); capfilt trusts it through download.ca_bundle, img2dataset through SSL_CERT_FILE (set before
Spark starts, so its workers inherit it). `--keep-alive` alone: plain HTTP, kept alive. Each arm's
connections and requests are counted by the servers themselves (requests per connection).

    .venv/bin/python bench/download.py [--rows 2000] [--repeats 3] [--threads 16] [--hosts 1]
                                       [--image-size 64 | 1024 | 512-2048] [--store-size 64] [--tls]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--hosts", type=int, default=1, help="loopback hosts serving the corpus (> 1: a polite arm too)")
    ap.add_argument("--polite-rate", type=float, default=1000, help="the polite arm's requests/s per host")
    ap.add_argument("--polite-connections", type=int, default=64, help="the polite arm's connections per host")
    ap.add_argument("--image-size", default="64", help="side of the corpus images: N or LOW-HIGH")
    ap.add_argument("--store-size", type=int, default=None, help="download.image_size (default: 64 for 64-px "
                                                                   "corpora, else 256)")
    ap.add_argument("--tls", action="store_true", help="serve HTTPS (kept alive) from a test CA both arms trust")
    ap.add_argument("--keep-alive", action="store_true", help="servers keep connections alive (HTTP/1.1)")
    args = ap.parse_args()
    sizes = [int(v) for v in args.image_size.split("-", 1)]
    web = max(sizes) > 64
    store = args.store_size or (256 if web else 64)

    import img2dataset

    from capfilt.jobs.download import main as download
    from capfilt.pipelines.config import load_config
    from capfilt.pipelines.session import spark_session
    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve_hosts

    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    make_web_corpus(work / "corpus", n=args.rows, seed=11, slow_ms=100,
                    image_size=sizes[0] if len(sizes) == 1 else tuple(sizes), jpeg_quality=(60, 95) if web else 90)
    tls, trust = None, []
    if args.tls:
        from capfilt.world.tls import CA_FILE, make_certificates
        tls = make_certificates(work / "tls")
        os.environ["SSL_CERT_FILE"] = str(tls / CA_FILE)  # img2dataset's urllib; before Spark's workers start
        trust = [f"download.ca_bundle={tls / CA_FILE}"]
    with serve_hosts(work / "corpus" / "site", args.hosts, tls=tls, keep_alive=args.tls or args.keep_alive) as servers:
        metadata = valid_utf8_copy(write_metadata(work / "corpus", servers[0].base_url),
                                   [server.base_url for server in servers])
        endpoints = [f"'{server.base_url.split('//')[1]}'" for server in servers]
        off = ["download.max_requests_per_second_per_host=0", "download.max_connections_per_host=0",
               "download.robots_txt=false"]
        base = [f"spark.master={args.master}", "spark.log_level=ERROR", f"download.image_size={store}",
                f"download.threads={args.threads}", "download.timeout=5", *off, *trust,
                f"download.allow_hosts=[{', '.join(endpoints)}, '127.0.0.1:1']"]
        cfg = load_config(None, base)
        spark = spark_session(cfg.spark)  # the download jobs below find it running
        parallelism = spark.sparkContext.defaultParallelism
        shard = -(-args.rows // parallelism)  # what the stage picks: one shard per core
        extras = ["id", "source_site", "license"]  # img2dataset refuses width/height; capfilt keeps them as input_*
        d = cfg.download
        arms = {"capfilt": [], **({"capfilt, full decode": ["download.reduced_decode=false"]} if web else {}),
                **({"capfilt, polite": ["download.robots_txt=true", "download.polite_to_allowed_hosts=true",
                                        f"download.max_requests_per_second_per_host={args.polite_rate}",
                                        f"download.max_connections_per_host={args.polite_connections}"]}
                   if args.hosts > 1 else {})}
        times = {"img2dataset": [], **{arm: [] for arm in arms}}
        served = {arm: [0, 0] for arm in times}  # connections, requests the servers saw

        def count(arm: str, before: tuple[int, int]) -> None:
            served[arm][0] += sum(s.connections for s in servers) - before[0]
            served[arm][1] += sum(len(s.requests) for s in servers) - before[1]

        def now() -> tuple[int, int]:
            return sum(s.connections for s in servers), sum(len(s.requests) for s in servers)

        for i in range(args.repeats):
            before = now()
            start = time.perf_counter()
            img2dataset.download(
                url_list=str(metadata), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=extras, output_format="parquet", output_folder=str(work / f"bare{i}"),
                distributor="pyspark", processes_count=parallelism, thread_count=d.threads,
                number_sample_per_shard=shard, image_size=d.image_size, resize_mode=d.resize_mode,
                encode_quality=d.encode_quality, encode_format=d.encode_format, min_image_size=d.min_image_size,
                max_image_area=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio, timeout=d.timeout,
                extract_exif=False, compute_hash="sha256", user_agent_token=d.user_agent_token)
            times["img2dataset"].append(time.perf_counter() - start)
            count("img2dataset", before)
            for j, (arm, overrides) in enumerate(arms.items()):
                out = work / f"capfilt{i}_{j}"
                before = now()
                start = time.perf_counter()
                # img2dataset always prints its progress too
                assert download(["--input", str(metadata), "--id-col", "id", "--output", str(out),
                                 *[a for kv in base + overrides for a in ("--set", kv)]]) in (0, None)
                times[arm].append(time.perf_counter() - start)
                count(arm, before)
                manifest = json.loads((out / "manifest.json").read_text())
                print(f"  {arm} phases:", manifest["timings"], "connections:",
                      {k: v for k, v in (manifest.get("connections") or {}).items() if k != "top_hosts"})
                print(f"repeat {i}: img2dataset {times['img2dataset'][-1]:.2f}s, {arm} {times[arm][-1]:.2f}s "
                      f"({manifest['counts']['output']} downloaded, {manifest['counts']['rejected_total']} rejected)",
                      flush=True)
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    print(f"\nrows={args.rows} threads={args.threads} master={args.master} shards of {shard} rows; images "
          f"{args.image_size} px stored at {store} px; {args.hosts} host(s); "
          f"{'HTTPS' if args.tls else 'HTTP'}{', kept alive' if args.tls or args.keep_alive else ''}")
    for k, v in rate.items():
        connections, requests = served[k]
        print(f"{k:<22} {v:8.1f} rows/s  (median of {args.repeats}: {statistics.median(times[k]):.2f}s); "
              f"{connections} connections, {requests / max(connections, 1):.1f} requests per connection")
    for arm in arms:
        goal = 1.3 if web and arm == "capfilt" else 0.90 if arm == "capfilt, polite" else 0.95
        print(f"ratio {arm} / img2dataset = {rate[arm] / rate['img2dataset']:.3f}  (goal >= {goal})")
    if web:  # against capfilt's own full decode: img2dataset's differs on purpose (EXIF rotation, CMYK, ...)
        psnr = stored_image_psnr(work / "capfilt0_1" / "data", work / "capfilt0_0" / "data")
        print(f"stored images, reduced vs full decode: {len(psnr)} matched, PSNR min {min(psnr):.1f} dB, "
              f"1st percentile {statistics.quantiles(psnr, n=100)[0]:.1f}, median {statistics.median(psnr):.1f} "
              f"(goal >= 35)")


def stored_image_psnr(full: Path, reduced: Path) -> list[float]:
    """PSNR of each image capfilt stored with reduced decoding against the one it stored with a full
    decode for the same row; 100 dB where they are identical (images not large enough to reduce)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    def by_uid(folder: Path) -> dict:
        rows = [r for f in sorted(folder.glob("*.parquet"))
                for r in pq.read_table(f, columns=["uid", "image"]).to_pylist()]
        return {r["uid"]: r["image"] for r in rows}

    ours, theirs = by_uid(reduced), by_uid(full)
    out = []
    for key in ours.keys() & theirs.keys():
        x, y = (np.asarray(Image.open(io.BytesIO(d)), dtype=float) for d in (ours[key], theirs[key]))
        out.append(float(10 * np.log10(255 ** 2 / max(((x - y) ** 2).mean(), 1e-10))))
    return out


def valid_utf8_copy(path: Path, hosts: list[str]) -> Path:
    """The corpus has a caption with invalid UTF-8 on purpose; bare img2dataset fails the whole shard
    on it (UnicodeDecodeError in its reader), capfilt repairs it. Compare on input both can read. Row i
    is served by hosts[i % len(hosts)] (the metadata names hosts[0])."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    raw = table.column("caption").cast(pa.binary()).to_pylist()
    fixed = pa.array([None if b is None else b.decode("utf-8", "replace") for b in raw], pa.string())
    urls = [u.replace(hosts[0], hosts[i % len(hosts)], 1) for i, u in enumerate(table.column("url").to_pylist())]
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
    out = path.with_name("metadata_valid_utf8.parquet")
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", fixed), out)
    return out


if __name__ == "__main__":
    main()
