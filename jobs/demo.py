"""`capfilt demo`: the pipeline end to end on a generated shapes-world corpus, served on 127.0.0.1.

Generates a noisy web corpus (with every fault kind), serves it on a loopback port, runs
`capfilt curate` on it in Spark local mode with the project's small models, stops the server, and
ends with `capfilt inspect`: the funnel, and an HTML report. The ground truth (world/truth.parquet)
is read only by tests and benchmarks.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from capfilt.jobs.common import add_config_args, config_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="capfilt demo", description=__doc__)
    p.add_argument("--out", default="demo-output", help="folder for the corpus and every stage's output")
    p.add_argument("--n", type=int, default=2000, help="rows in the web corpus")
    p.add_argument("--seed", type=int, default=0)
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = shapes_world_settings(config_from_args(args))

    from capfilt.jobs.curate import curate
    from capfilt.pipelines.inputs import InputSpec
    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve

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
        hosts = [f"127.0.0.1:{server.port}", "127.0.0.1:1"]
        cfg.download.allow_hosts = [*cfg.download.allow_hosts, *hosts]
        # The demo reruns from scratch (overwrite): the server's port, hence every URL, is new each time.
        cfg.output.overwrite = True
        rc = curate(cfg, InputSpec.from_preset(str(metadata), "default", id_col="id"), str(out))
    if rc:
        return rc
    from capfilt.jobs.report import main as inspect
    report = out.with_name(f"{out.name}-report.html")  # beside OUT: --html never writes inside an output
    print()
    inspect([str(out), "--html", str(report)])
    print(f"\n[demo] done in {time.time() - started:.0f}s. Where things are:")
    print(f"  corpus + ground truth   {corpus}  (truth.parquet is read by tests/benchmarks only)")
    print(f"  curated (train on it)   {out / 'curated'}")
    print(f"  rejects (with reasons)  {out / 'rejects'}")
    print(f"  run manifest            {out / 'manifest.json'}")
    print(f"  each stage's output     {out / 'stages'}/<stage>/{{data,rejects,manifest.json}}")
    print(f"  report (open it)        {report}")
    print(f"  export for training     capfilt export {out} --format webdataset --to {out}-webdataset")
    return 0


def shapes_world_settings(cfg):
    """The settings for a shapes-world corpus: 64-px images and the project's own small models
    (models/, trained on the shapes world by lab/): no hub here."""
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_ITM
    cfg.download.image_size = 64
    cfg.caption.model, cfg.filter.model, cfg.filter.itm_model = SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_ITM
    cfg.filter.threshold = _card_threshold(SHAPES_CLIP, cfg.filter.threshold)
    cfg.filter.itm_threshold = _card_threshold(SHAPES_ITM, cfg.filter.itm_threshold)  # filter.scorer itm, two_step
    cfg.filter.clip_floor = _card_threshold(SHAPES_CLIP, cfg.filter.clip_floor, "floor_keeping_99pct")
    for key, value in DEMO_DEDUP.items():
        setattr(cfg.dedup, key, value)
    return cfg


# Dedup settings for the shapes CLIP, whose cosine scale is its own (docs/dedup.md has the measurements).
DEMO_DEDUP = {"image_threshold": 0.99, "pixel_max_changed": 0.002}


def _card_threshold(model_dir: str, default: float, metric: str = "recommended_threshold") -> float:
    """A small model's score scale is its own: its model card states the threshold measured for it."""
    import json
    card = Path(model_dir) / "model_card.json"
    if card.exists():
        return float(json.loads(card.read_text()).get("metrics", {}).get(metric, default))
    return default


def _as_overrides(cfg) -> list[str]:
    """The demo's settings as --set arguments, for tests and benchmarks that run the commands as users do."""
    import json
    args = ["--set", f"seed={cfg.seed}"]
    for section in ("download", "caption", "filter", "dedup"):
        for key, value in getattr(cfg, section).__dict__.items():
            args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args
