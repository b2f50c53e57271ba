"""The shape of a `capfilt curate` output: storage, decodes, and a model-free rerun (not a timed test).

On the quality corpus (bench/quality.py's web corpus: default 10,000 rows, the same held-out seed,
served on 127.0.0.1), with the shapes-world settings and the shapes CLIP copied to WORK/clip:

1. `capfilt curate` in a child process (`--set filter.model=WORK/clip`), timed wall clock, into a
   fresh OUT.
2. Storage: bytes of every file under OUT over the bytes of the downloaded images, the images
   counted two ways: (a) the `image` column chunks as stored in stages/download's Parquet (sum of
   total_compressed_size over the row groups in the footers; the headline) and (b) the raw image
   bytes (sum of len(image)). Bytes per top-level folder and stage, and per curated row.
3. Decodes per row of the model pass (stages/caption figures.decoded_images / rows in; the filter's
   own decodes, 0 when fused) and each stage's model_passes, from the stage manifests.
4. WORK/clip renamed away (the model reference cannot load), the same curate rerun with
   `--set filter.rule=topk`: it must exit 0 and the filter stage must report no model pass and no
   decode. Its wall time over the first run's, and curated/rejected of both runs. WORK/clip is
   restored at the end.
5. --unfused: the same with caption.fuse_filter=false (two decodes per row expected), for comparison.

    .venv/bin/python bench/shape.py [--n 10000] [--unfused] [--work /tmp/capfilt-bench-shape]
        [--json FILE]

The corpus under --work is reused by a later run; every curate output is made afresh.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS_SEED = 10_001  # bench/quality.py's held-out corpus seed
STAGES = ("download", "caption", "filter", "dedup")
GOALS = {"storage": 2.2, "rerun": 0.20}


# --- curate ----------------------------------------------------------------------------------------

def curate(metadata: Path, out: Path, port: int, overrides: list[str], log: Path) -> tuple[float, str]:
    """`capfilt curate` in a child process with the shapes-world settings; (wall seconds, output).
    A failure prints the last 60 lines and the stage it was in, and stops the bench."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config

    settings = _as_overrides(shapes_world_settings(load_config(None, ["download.retries=1"])))
    cmd = [sys.executable, "-m", "capfilt.jobs.cli", "curate", "--input", str(metadata), "--output", str(out),
           "--id-col", "id", "--no-progress", "--allow-host", f"127.0.0.1:{port}", "--allow-host", "127.0.0.1:1",
           *settings, *[a for kv in overrides for a in ("--set", kv)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    log.write_text(proc.stdout)
    if proc.returncode:
        stages = re.findall(r"\[curate\] stage \d+/\d+: (\w+)", proc.stdout)
        where = "write" if "[curate] write:" in proc.stdout else (stages[-1] if stages else "before any stage")
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise SystemExit(f"curate {' '.join(overrides)} -> {out} failed (exit {proc.returncode}, {seconds:.0f}s) "
                         f"in {where} (full log {log}); last 60 lines:\n{tail}")
    print(f"[shape] curate {' '.join(overrides)} -> {out}: exit 0, {seconds:.1f}s wall (log {log})", flush=True)
    return seconds, proc.stdout


# --- measurements ----------------------------------------------------------------------------------

def tree_bytes(path: Path) -> int:
    """Bytes of every file under path (or of path itself), hidden ones (.crc, _SUCCESS) included."""
    if path.is_file():
        return path.stat().st_size
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(path) for f in files)


def image_bytes(download: Path) -> tuple[int, int, int]:
    """(image column chunks' compressed bytes from the footers, raw image bytes, rows) of the download."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    stored = raw = rows = 0
    for name in sorted((download / "data").rglob("*.parquet")):
        f = pq.ParquetFile(name)
        meta = f.metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stored += sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                          if group.column(c).path_in_schema == "image")
        column = f.read(columns=["image"]).column("image")
        raw += int(pc.sum(pc.binary_length(column)).as_py() or 0)
        rows += meta.num_rows
    return stored, raw, rows


def storage(out: Path) -> dict:
    """Bytes under OUT: in all, per top-level entry, per stage and its sub-folders; the images' bytes."""
    total = tree_bytes(out)
    top = {}
    for entry in sorted(out.iterdir()):
        if entry.name == "stages":
            for stage in sorted(entry.iterdir()):
                top[f"stages/{stage.name}"] = tree_bytes(stage)
        else:
            top[entry.name] = tree_bytes(entry)
    inside = {f"stages/{s.name}": {e.name: tree_bytes(e) for e in sorted(s.iterdir())}
              for s in sorted((out / "stages").iterdir())}
    stored, raw, rows = image_bytes(out / "stages" / "download")
    return {"total": total, "top": top, "stages": inside, "image_stored": stored, "image_raw": raw,
            "download_rows": rows}


def manifests(out: Path) -> tuple[dict, dict]:
    return (json.loads((out / "manifest.json").read_text()),
            {s: json.loads((out / "stages" / s / "manifest.json").read_text()) for s in STAGES})


def _mb(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB"


def print_storage(s: dict, curated: int) -> None:
    print(f"  every file under OUT: {s['total']:,} bytes ({_mb(s['total']).strip()})")
    print(f"  downloaded images: {s['download_rows']:,} rows; (a) image column chunks in stages/download "
          f"Parquet: {s['image_stored']:,} bytes; (b) raw image bytes: {s['image_raw']:,} bytes")
    a = s["total"] / s["image_stored"] if s["image_stored"] else None
    b = s["total"] / s["image_raw"] if s["image_raw"] else None
    print(f"  storage ratio (a) OUT / stored image column: {a:.3f}   (goal <= {GOALS['storage']}: "
          f"{'met' if a is not None and a <= GOALS['storage'] else 'MISSED'})" if a is not None else
          "  storage ratio (a): no image bytes")
    print(f"  storage ratio (b) OUT / raw image bytes:     {b:.3f}" if b is not None else
          "  storage ratio (b): no image bytes")
    print(f"  {'folder':<20} {'bytes':>14} {'':>13} {'share':>7} {'/ image col (a)':>16}")
    for name, n in s["top"].items():
        print(f"  {name:<20} {n:>14,} {_mb(n)} {n / s['total']:>7.1%} "
              f"{n / s['image_stored'] if s['image_stored'] else float('nan'):>16.3f}")
    for stage, parts in s["stages"].items():
        print(f"    {stage}: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    if curated:
        print(f"  per curated row ({curated:,} rows): all of OUT {s['total'] / curated:,.0f} bytes, "
              f"curated/ {s['top'].get('curated', 0) / curated:,.0f} bytes, image column (a) per downloaded row "
              f"{s['image_stored'] / max(1, s['download_rows']):,.0f} bytes")


def print_figures(top: dict, stage_manifests: dict) -> None:
    print(f"  {'stage':<9} {'model_passes':<30} {'decoded':>8} {'rows in':>8} {'rows out':>8} {'decodes/row':>11} "
          f"{'seconds':>8} {'rows/s':>8} {'bytes_written':>14} {'reused':>6}")
    for stage in STAGES:
        t = top.get("stages", {}).get(stage, {})  # the stage's figures | its rates, and reused
        f = stage_manifests[stage].get("figures", {}) | {k: v for k, v in t.items() if k != "counts"}
        rows_in = f.get("rows_in", stage_manifests[stage]["counts"]["input"])
        decoded = f.get("decoded_images")
        per_row = f"{decoded / rows_in:.3f}" if decoded is not None and rows_in else "-"
        print(f"  {stage:<9} {json.dumps(f.get('model_passes', '-')):<30} {str(decoded if decoded is not None else '-'):>8} "
              f"{rows_in:>8} {str(f.get('rows_out', '-')):>8} {per_row:>11} {str(f.get('seconds', '-')):>8} "
              f"{str(f.get('rows_per_s', '-')):>8} {str(f.get('bytes_written', '-')):>14} {str(t.get('reused', '-')):>6}")
    w = top.get("write", {})
    print(f"  {'write':<9} {json.dumps(w.get('model_passes', '-')):<30} {'-':>8} {str(w.get('rows_in', '-')):>8} "
          f"{str(w.get('rows_out', '-')):>8} {'-':>11} {str(w.get('seconds', '-')):>8} {str(w.get('rows_per_s', '-')):>8} "
          f"{str(w.get('bytes_written', '-')):>14}")
    caption, filter_ = stage_manifests["caption"]["figures"], stage_manifests["filter"]["figures"]
    rows = caption.get("rows_in") or stage_manifests["caption"]["counts"]["input"]
    total = caption.get("decoded_images", 0) + filter_.get("decoded_images", 0)
    print(f"  decodes per row of the model pass: caption {caption.get('decoded_images')} / {rows} rows in = "
          f"{caption.get('decoded_images', 0) / max(1, rows):.3f}; filter {filter_.get('decoded_images')} "
          f"(/ {filter_.get('rows_in')} rows in); caption + filter per caption row in = {total / max(1, rows):.3f}")


def counts(top: dict) -> str:
    c = top["counts"]
    return f"{c['input']} in, {c['output']} curated, {c['rejected_total']} rejected"


# --- one arm: first run, storage, decodes, rerun without the model ----------------------------------

def arm(name: str, extra: list[str], work: Path, metadata: Path, port: int) -> dict:
    from capfilt.udfs.models import SHAPES_CLIP
    clip, away = work / "clip", work / "clip.away"
    for path in (clip, away):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(SHAPES_CLIP, clip)
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    base = [f"filter.model={clip}", *extra]
    print(f"\n=== {name}: {' '.join(base)} ===", flush=True)
    first_s, _ = curate(metadata, out, port, base, work / f"{name}-first.log")
    top, stage_m = manifests(out)
    report = {"overrides": base, "first": {"wall_s": round(first_s, 1), "manifest_seconds": top["seconds"],
                                           "counts": top["counts"], "stages": top["stages"], "write": top["write"]}}
    print(f"[shape] {name} first run: {first_s:.1f}s wall, manifest seconds {top['seconds']}; {counts(top)}")
    s = storage(out)
    report["first"]["storage"] = s
    print(f"\n[shape] {name}: storage after the first run")
    print_storage(s, top["counts"]["output"])
    print(f"\n[shape] {name}: stage figures of the first run (stage manifests and OUT/manifest.json)")
    print_figures(top, stage_m)

    os.rename(clip, away)
    try:
        rerun_s, _ = curate(metadata, out, port, [*base, "filter.rule=topk"], work / f"{name}-rerun.log")
    finally:
        os.rename(away, clip)
    top2, stage_m2 = manifests(out)
    f2 = stage_m2["filter"]["figures"]
    passes = sum((f2.get("model_passes") or {}).values())
    decoded = f2.get("decoded_images")
    ratio = rerun_s / first_s
    report["rerun"] = {"wall_s": round(rerun_s, 1), "manifest_seconds": top2["seconds"], "ratio": round(ratio, 4),
                       "counts": top2["counts"], "stages": top2["stages"], "write": top2["write"],
                       "filter_model_passes": f2.get("model_passes"), "filter_decoded_images": decoded}
    print(f"\n[shape] {name}: rerun with filter.rule=topk, {clip} renamed away: exit 0, {rerun_s:.1f}s wall "
          f"(manifest seconds {top2['seconds']})")
    print(f"  rerun / first wall time: {rerun_s:.1f} / {first_s:.1f} = {ratio:.3f}   (goal <= {GOALS['rerun']}: "
          f"{'met' if ratio <= GOALS['rerun'] else 'MISSED'})")
    print(f"  filter stage in the new manifest: model_passes {json.dumps(f2.get('model_passes'))}, decoded_images "
          f"{decoded}   (must be 0: {'met' if passes == 0 and decoded == 0 else 'MISSED'})")
    print(f"  first run: {counts(top)}")
    print(f"  rerun:     {counts(top2)}")
    print(f"\n[shape] {name}: stage figures of the rerun")
    print_figures(top2, stage_m2)
    s2 = storage(out)
    report["rerun"]["storage"] = {k: s2[k] for k in ("total", "top")}
    print(f"  every file under OUT after the rerun: {s2['total']:,} bytes; ratio (a) "
          f"{s2['total'] / max(1, s2['image_stored']):.3f}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="rows in the web corpus")
    ap.add_argument("--noise", type=float, default=0.45, help="share of plain rows with a wrong caption")
    ap.add_argument("--unfused", action="store_true", help="also run with caption.fuse_filter=false")
    ap.add_argument("--work", default="/tmp/capfilt-bench-shape")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"world-{args.n}-{args.noise}"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=args.n, seed=CORPUS_SEED, noise=args.noise, slow_ms=200, overwrite=True)
    summary = json.loads((corpus / "corpus.json").read_text())
    print(f"[shape] corpus: {args.n} rows (seed {CORPUS_SEED}), {summary['image_rows']} image rows, "
          f"{sum(summary['faults'].values())} fault rows -> {corpus}", flush=True)
    arms = {"fused": []} | ({"unfused": ["caption.fuse_filter=false"]} if args.unfused else {})
    report = {"n": args.n, "corpus_seed": CORPUS_SEED, "arms": {}}
    with serve(corpus / "site") as server:
        metadata = write_metadata(corpus, server.base_url)
        for name, extra in arms.items():
            report["arms"][name] = arm(name, extra, work, metadata, server.port)

    print("\n[shape] summary")
    for name, r in report["arms"].items():
        s, f = r["first"]["storage"], r["first"]["stages"]
        rows = f["caption"].get("rows_in") or 0
        decodes = (f["caption"].get("decoded_images") or 0) + (f["filter"].get("decoded_images") or 0)
        print(f"  {name:<8} first {r['first']['wall_s']:>7.1f}s  rerun {r['rerun']['wall_s']:>6.1f}s "
              f"(ratio {r['rerun']['ratio']:.3f})  storage (a) {s['total'] / max(1, s['image_stored']):.3f} "
              f"(b) {s['total'] / max(1, s['image_raw']):.3f}  decodes/row {decodes / max(1, rows):.3f}  "
              f"rerun filter passes {json.dumps(r['rerun']['filter_model_passes'])} decoded "
              f"{r['rerun']['filter_decoded_images']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
