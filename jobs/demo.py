"""`capfilt demo`: the pipeline end to end on a generated shapes-world corpus, served on 127.0.0.1.

Generates a noisy web corpus (with every fault kind), serves it on a loopback port, runs every stage
that exists on it in Spark local mode, prints the funnel and where each output is, and stops the
server. The ground truth is used only to print how each planted fault ended.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from jobs.common import add_config_args, config_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="capfilt demo", description=__doc__)
    p.add_argument("--out", default="demo-output", help="folder for the corpus and every stage's output")
    p.add_argument("--n", type=int, default=2000, help="rows in the web corpus")
    p.add_argument("--seed", type=int, default=0)
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    # The demo reruns from scratch: the server's port, hence every URL, is new each time.
    cfg.output.overwrite = True
    cfg.download.image_size = 64
    # The project's own small models (models/, trained on the shapes world by lab/): no hub here.
    from udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP
    cfg.caption.model, cfg.filter.model = SHAPES_CAPTIONER, SHAPES_CLIP
    cfg.filter.threshold = _card_threshold(SHAPES_CLIP, cfg.filter.threshold)
    for key, value in DEMO_DEDUP.items():
        setattr(cfg.dedup, key, value)

    from jobs.download import download, print_funnel
    from pipelines.inputs import InputSpec
    from pipelines.output import StageOutput
    from pipelines.session import spark_session
    from world.corpus import make_web_corpus, write_metadata
    from world.server import serve

    out = Path(args.out).resolve()
    corpus = out / "world"
    started = time.time()
    summary = make_web_corpus(corpus, n=args.n, seed=args.seed, slow_ms=1000, overwrite=True)
    print(f"[demo] corpus: {args.n} rows, noise {summary['noise_share']:.0%} of image rows, "
          f"{sum(summary['faults'].values())} fault rows -> {corpus}")
    with serve(corpus / "site") as server:
        metadata = write_metadata(corpus, server.base_url)
        print(f"[demo] serving on {server.base_url} (loopback only); metadata: {metadata}")
        # 127.0.0.1:1 is where the corpus's 'refused' rows point: allowed, so they show as refused.
        cfg.download.allow_hosts = [*cfg.download.allow_hosts, f"127.0.0.1:{server.port}", "127.0.0.1:1"]
        spark = spark_session(cfg.spark)
        print(f"[demo] Spark {spark.version}, master {spark.sparkContext.master}, UI {spark.sparkContext.uiWebUrl}")
        stage_dir = out / "stages" / "download"
        counts = download(spark, InputSpec(str(metadata), id_col="id"), StageOutput(str(stage_dir), "download",
                                                                                    overwrite=True), cfg)
    print_funnel(counts, str(stage_dir))
    stages = out / "stages"
    for name, previous in (("caption", "download"), ("filter", "caption"), ("dedup", "filter")):
        what = getattr(getattr(cfg, name), "model", "exact, faiss images, MinHash captions")
        print(f"\n[demo] {name} ({what})", flush=True)
        job = f"jobs.{name}"
        importlib.import_module(job).main(["--input", str(stages / previous), "--output", str(stages / name),
                                           "--overwrite", *_as_overrides(cfg, name)])
    print(f"\n[demo] done in {time.time() - started:.0f}s. Where things are:")
    print(f"  corpus + ground truth   {corpus}  (truth.parquet is read by tests/benchmarks only)")
    for name in ("download", "caption", "filter", "dedup"):
        print(f"  {name:<22}  {stages / name}/{{data,rejects,manifest.json}}")
    print(f"  check a contract        capfilt validate {stages / 'dedup'} --contract curated")
    return 0


# Dedup settings for the shapes CLIP, whose cosine scale is its own (docs/dedup.md has the measurements).
DEMO_DEDUP = {"image_threshold": 0.99}


def _card_threshold(model_dir: str, default: float) -> float:
    """A small model's cosine scale is its own: its model card states the threshold measured for it."""
    import json
    card = Path(model_dir) / "model_card.json"
    if card.exists():
        return float(json.loads(card.read_text()).get("metrics", {}).get("recommended_threshold", default))
    return default


def _as_overrides(cfg, section: str) -> list[str]:
    """The demo's settings for a stage, as --set arguments (the stage jobs read config like users do)."""
    import json
    args = ["--set", f"seed={cfg.seed}"]
    for key, value in getattr(cfg, section).__dict__.items():
        args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args
