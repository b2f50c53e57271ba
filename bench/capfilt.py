"""Caption and filter stages vs raw loops, side by side in one run (not a timed test).

Same images (shapes world), same model, same total threads: the stage runs in Spark local[W] with
T torch threads per worker; the raw loop does decode + preprocess + model calls in batches over images
already in memory, nothing else, laid out two ways: one process with W*T threads (`threads`, the
layout of the figures in the issue that set the goals), and W processes with T threads each over a
contiguous slice (`processes`, Spark's own layout: on a small CPU it is the stronger floor, as torch's
threads gain little on tiny models). Prints rows/s of each and the ratio stage / raw (goal >= 0.90).
Four comparisons (--which): `filter` (the `capfilt filter` command vs decode + CLIP over the web and
synthetic captions), `itm` (`capfilt filter` with filter.scorer=itm vs the same loop with BLIP's ITM
after CLIP: `ItmModel.embed` on the batch's images, `ItmModel.match` on every image-caption pair),
`caption` (`capfilt caption` vs decode + generate) and `fused` (what curate runs: the caption stage
with the filter's CLIP in the same pass, vs one loop that decodes once, generates and scores).
The raw filter loop times its CLIP part (and with `itm` its ITM part) apart, on the same images, and
prints each one's ms per (image, caption) pair beside the stage's own figures from its manifest
(models.scoring: each step's model seconds summed over the workers).

What each side times. Stage: the whole `capfilt filter` / `capfilt caption` command run in this
process's Spark session: config and manifests, the input view (download files joined with earlier
stages' columns), the model pass (Parquet read, Arrow to the Python workers, decode, model, Arrow
back) and its output written per part, the split into records and rejects, their writes, the counts
read back and the commit. Raw: decode + preprocess + model calls; its model is loaded before the
clock starts, as the stage's warm Python workers hold theirs. Besides the ratio, the model pass
alone is timed (the same view and batch UDF, output discarded by Spark's noop sink), so the
stage's cost splits into the model pass and the rest (writes, split, counts, commit): the first is
per row, the second mostly fixed per run, so it weighs most at few rows.

Order: raw warm-ups, stage warm-up, model pass warm-up, then stage, model pass, raw measured. The
stage's runs stay together: Spark stops a Python worker idle for 60 s, and a slow raw loop between
them made the measured stage import torch and load its model again.

Run it on an otherwise idle machine (the load average is printed before and after): under load the
raw loop's multi-threaded torch loses far more than the stage's single-threaded workers, and the
ratio says nothing (at load average 11 on 2 cores the raw caption loop took 455 s for 1,000 rows,
an idle machine about 9 s).

    .venv/bin/python bench/capfilt.py [--rows 2000] [--workers 2] [--threads 1] [--which filter,itm,caption,fused]
                                      [--raw-layout threads|processes|both]
                                      [--clip vit-b-32] [--captioner blip-base] [--itm PATH]
"""
from __future__ import annotations

import functools

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_vit_b_32(folder: Path) -> str:
    """The filter's default architecture with random weights, saved as a local checkpoint: the
    speed of ViT-B-32 does not depend on its weights, and no hub is reachable here."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32")}))
    save_file(open_clip.create_model("ViT-B-32").state_dict(), str(folder / "open_clip_model.safetensors"))
    return str(folder)


def random_blip_base(folder: Path) -> str:
    """A captioner of BLIP-base's size (ViT-B/16 at 224 px, a 12-layer 768-wide text decoder) with random
    weights and the shapes-world tokenizer, saved as a local checkpoint: BLIP-base's speed but for the
    small vocabulary (no hub is reachable here). The same checkpoint feeds both sides."""
    import json
    import shutil

    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    from capfilt.udfs.models import SHAPES_CAPTIONER
    torch.manual_seed(0)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(SHAPES_CAPTIONER, folder)
    small = json.loads((folder / "config.json").read_text())
    text = {**small["text_config"], "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "encoder_hidden_size": 768}
    vision = {**small["vision_config"], "image_size": 224, "patch_size": 16, "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=512)) \
        .save_pretrained(folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["size"] = {"height": 224, "width": 224}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(folder)


def raw_filter(images: list[bytes], captions: list[str], synthetic: list[list[str]], clip, batch: int,
               itm=None, itm_batch: int = 256) -> dict:
    """Decode + CLIP over each image's web and synthetic captions; with `itm`, BLIP's ITM on every
    (image, caption) pair too. Returns each step's model seconds, timed apart on the same images."""
    import torch
    from PIL import Image

    seconds = {"clip": 0.0, **({"itm": 0.0} if itm is not None else {})}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
            texts = [[captions[i], *synthetic[i]] for i in range(start, start + len(pil))]
            started = time.perf_counter()
            clip_scores(clip, pil, texts)
            seconds["clip"] += time.perf_counter() - started
            if itm is not None:
                started = time.perf_counter()
                itm_match(itm, pil, texts, batch, itm_batch)
                seconds["itm"] += time.perf_counter() - started
    return seconds


def clip_scores(clip, pil: list, texts: list[list[str]]):
    """Each image's cosine with each of its texts (the same count per image)."""
    import torch
    img = clip.model.encode_image(torch.stack([clip.preprocess(p) for p in pil]), normalize=True)
    txt = clip.model.encode_text(clip.tokenizer([t for row in texts for t in row]), normalize=True)
    return txt.view(len(pil), -1, txt.shape[-1]) @ img[:, :, None]


def itm_match(itm, pil: list, texts: list[list[str]], batch: int, itm_batch: int):
    """Each image's match probability with each of its texts: the vision tower once per image, the
    text encoder on every pair."""
    rows = [i for i, row in enumerate(texts) for _ in row]
    return itm.match(itm.embed(pil, batch_size=batch), rows, [t for row in texts for t in row], batch_size=itm_batch)


def raw_caption(images: list[bytes], captioner, k: int, batch: int, max_new_tokens: int, offset: int = 0) -> None:
    from PIL import Image

    for start in range(0, len(images), batch):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
        captioner.generate(pil, num_captions=k, top_p=0.9, seeds=list(range(offset + start, offset + start + len(pil))),
                           max_new_tokens=max_new_tokens, batch_size=batch)


def raw_fused(images: list[bytes], captions: list[str], captioner, clip, k: int, batch: int, max_new_tokens: int,
              offset: int = 0) -> None:
    """Decode once; the captioner's captions, then CLIP over the web caption and them."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
            synthetic = captioner.generate(pil, num_captions=k, top_p=0.9,
                                           seeds=list(range(offset + start, offset + start + len(pil))),
                                           max_new_tokens=max_new_tokens, batch_size=batch)
            clip_scores(clip, pil, [[captions[start + i], *synthetic[i]] for i in range(len(pil))])


# The raw loop in worker processes (--raw-layout processes): each worker holds the inputs and the
# models (loaded when it starts) and runs the loop over a contiguous slice.
_RAW: dict = {}


def load_models(which: str, refs: dict) -> dict:
    """The models the raw loop of `which` holds, on the CPU."""
    from capfilt.udfs.models import load_captioner, load_clip, load_itm
    return {"clip": load_clip(refs["clip"], "cpu") if which in ("filter", "itm", "fused") else None,
            "captioner": load_captioner(refs["captioner"], "cpu") if which in ("caption", "fused") else None,
            "itm": load_itm(refs["itm"], "cpu") if which == "itm" else None}


def _raw_worker_init(which: str, refs: dict, threads: int, data: dict) -> None:
    import torch
    torch.set_num_threads(threads)
    _RAW.update(data, which=which, models=load_models(which, refs))


def _raw_slice(start: int, stop: int) -> dict | None:
    return run_raw(_RAW["which"], _RAW, _RAW["models"], start, stop)


def run_raw(which: str, data: dict, models: dict, start: int, stop: int) -> dict | None:
    """The raw loop over rows [start, stop); filter and itm return each step's model seconds."""
    images, captions, synthetic, k = data["images"][start:stop], data["captions"][start:stop], \
        data["synthetic"][start:stop], data["k"]
    if which in ("filter", "itm"):
        from capfilt.pipelines.config import FilterSettings
        batches = FilterSettings()  # the stage's default batch sizes
        return raw_filter(images, captions, synthetic, models["clip"], batches.batch_size, models["itm"],
                          batches.itm_batch_size)
    if which == "caption":
        raw_caption(images, models["captioner"], k, 32, 30, start)
    else:
        raw_fused(images, captions, models["captioner"], models["clip"], k, 32, 30, start)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per Spark worker")
    ap.add_argument("--which", default="filter,caption,fused",
                    help="fused: the caption stage with the filter's CLIP in its pass, as curate runs it; itm: the "
                         "filter stage with filter.scorer=itm (CLIP, then BLIP's ITM on every caption)")
    ap.add_argument("--raw-layout", choices=("threads", "processes", "both"), default="both",
                    help="threads: 1 process x workers*threads torch threads; processes: workers processes x "
                         "threads (Spark's layout)")
    ap.add_argument("--clip", default=None, help="default: the shapes-world CLIP in models/; 'vit-b-32': the "
                                                 "default architecture, random weights")
    ap.add_argument("--captioner", default=None, help="default: the shapes-world captioner in models/; 'blip-base': "
                                                      "BLIP-base's size with random weights")
    ap.add_argument("--itm", default=None, help="ITM model (--which itm); default: the shapes-world ITM in models/")
    ap.add_argument("--captions", type=int, default=5, help="synthetic captions per image")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    import pyarrow.parquet as pq
    import torch

    from capfilt.jobs.common import run_stage_job
    caption_main, filter_main = (functools.partial(run_stage_job, name) for name in ("caption", "filter"))
    from capfilt.pipelines.config import SparkSettings, load_config
    from capfilt.pipelines.output import read_manifest
    from capfilt.pipelines.session import spark_session
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import run_stage
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP, SHAPES_ITM
    from capfilt.world.captions import describe
    from capfilt.world.corpus import make_annotated
    from capfilt.world.scene import Scene

    work = Path(tempfile.mkdtemp(prefix="bench-capfilt-"))
    clip_ref, cap_ref = args.clip or SHAPES_CLIP, args.captioner or SHAPES_CAPTIONER
    if clip_ref == "vit-b-32":
        clip_ref = random_vit_b_32(work / "vit-b-32")
    if cap_ref == "blip-base":
        cap_ref = random_blip_base(work / "blip-base")
    table = pq.read_table(make_annotated(work, n=args.rows, seed=4242))
    images = table.column("image").to_pylist()
    scenes = [Scene.from_json(s) for s in table.column("scene").to_pylist()]
    captions = [describe(s, 0) for s in scenes]
    synthetic = [[describe(s, 1 + j % 4) for j in range(args.captions)] for s in scenes]

    spark = spark_session(SparkSettings(master=f"local[{args.workers}]", log_level="ERROR",
                                        conf={"spark.ui.showConsoleProgress": "false"}))
    rows = [(f"r{i}", f"http://h/{i}", captions[i], images[i], 64, 64, 64, 64, "0" * 64, synthetic[i])
            for i in range(args.rows)]
    write_inputs(spark, work, rows, args.workers)
    sources = {"filter": work / "captioned", "itm": work / "captioned", "caption": work / "downloaded",
               "fused": work / "downloaded"}

    common = ["--set", f"spark.master=local[{args.workers}]"]
    settings = {"filter": {"model": clip_ref, "torch_threads": args.threads, "threshold": -1, "device": "cpu"},
                "caption": {"model": cap_ref, "torch_threads": args.threads, "num_captions": args.captions,
                            "device": "cpu"}}
    refs = {"clip": clip_ref, "captioner": cap_ref, "itm": args.itm or SHAPES_ITM}
    # itm: the filter with BLIP's ITM on every caption; threshold 0 keeps every row, as -1 does for CLIP
    itm_settings = {**settings, "filter": {**settings["filter"], "scorer": "itm", "itm_model": refs["itm"],
                                           "itm_threshold": 0}}
    data = {"images": images, "captions": captions, "synthetic": synthetic, "k": args.captions}
    layouts = ["threads", "processes"] if args.raw_layout == "both" else [args.raw_layout]
    print(f"rows={args.rows}  stage: local[{args.workers}] x {args.threads} torch thread(s);  raw loop: "
          + " and ".join({"threads": f"1 process x {args.workers * args.threads} threads",
                          "processes": f"{args.workers} processes x {args.threads} thread(s)"}[x] for x in layouts)
          + f";  load average before start {load_before:.1f} ({os.cpu_count()} cores)", flush=True)
    for which in args.which.split(","):
        sections = itm_settings if which == "itm" else settings
        torch.set_num_threads(args.workers * args.threads)
        models = load_models(which, refs)
        pool = ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_raw_worker_init,
                                   initargs=(which, refs, args.threads, data)) \
            if "processes" in layouts else None
        chunks = [(args.rows * w // args.workers, args.rows * (w + 1) // args.workers) for w in range(args.workers)]
        steps = {}  # layout -> each model step's seconds in the measured raw run, summed over its processes

        def raw(layout):
            start = time.perf_counter()
            if layout == "threads":
                seconds = [run_raw(which, data, models, 0, args.rows)]
            else:
                seconds = [done.result() for done in [pool.submit(_raw_slice, *c) for c in chunks]]
            if seconds[0] is not None:
                steps[layout] = {k: sum(s[k] for s in seconds) for k in seconds[0]}
            return time.perf_counter() - start

        def stage(attempt):
            start = time.perf_counter()
            out = str(work / f"{which}-{attempt}")
            sets = [f"{name}.{key}={value}" for name, values in sections.items() for key, value in values.items()]
            if which == "fused":  # what curate runs: the caption stage with the filter's pass fused in
                cfg = load_config(None, [f"spark.master=local[{args.workers}]", *sets])
                run_stage(definition("caption"), cfg, str(work / "downloaded"), out, fuse=[("filter", definition("filter").model)])
            else:
                name = STAGE_OF[which]
                (filter_main if name == "filter" else caption_main)(
                    ["--input", str(sources[which]), "--output", out, *common,
                     *[a for key, value in sections[name].items() for a in ("--set", f"{name}.{key}={value}")]])
            return time.perf_counter() - start

        def model_pass():
            start = time.perf_counter()
            run_model_pass(spark, which, sources[which], sections)
            return time.perf_counter() - start

        t = {f"raw {x} warm-up": raw(x) for x in layouts}
        t.update({"stage warm-up": stage("warm-up"), "model pass warm-up": model_pass()})
        t.update({"stage": stage("measured"), "model pass": model_pass()})
        t.update({f"raw {x}": raw(x) for x in layouts})
        if pool:
            pool.shutdown()
        print("  " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
        stage_rate, pass_rate = args.rows / t["stage"], args.rows / t["model pass"]
        for x in layouts:
            raw_rate = args.rows / t[f"raw {x}"]
            print(f"{which:<8} raw loop ({x}) {raw_rate:8.1f} rows/s   stage {stage_rate:8.1f} rows/s   "
                  f"ratio stage/raw = {stage_rate / raw_rate:.3f}  (goal >= 0.90);  model pass alone "
                  f"{pass_rate:.1f} rows/s = {pass_rate / raw_rate:.3f} of raw", flush=True)
        print(f"{'':<8} the stage's other work (model output write, split, writes, counts, commit) "
              f"{t['stage'] - t['model pass']:.2f}s of {t['stage']:.2f}s;  load average {os.getloadavg()[0]:.1f}",
              flush=True)
        if steps:
            print_pair_costs(steps, args, read_manifest(str(work / f"{which}-measured"))["models"].get("scoring", {}))


STAGE_OF = {"filter": "filter", "itm": "filter", "caption": "caption", "fused": "caption"}


def print_pair_costs(steps: dict, args, stage_scoring: dict) -> None:
    """ms per (image, caption) pair of the raw loop's CLIP part (and ITM part), timed apart on the same
    images, per layout; and the stage's own figures from its manifest (summed model seconds per step)."""
    pairs = args.rows * (1 + args.captions)  # the web caption and every synthetic one
    where = {"threads": f"1 process x {args.workers * args.threads} threads",
             "processes": f"seconds summed over {args.workers} processes x {args.threads} thread(s)"}
    for layout, seconds in steps.items():
        ms = {k: 1000 * v / pairs for k, v in seconds.items()}
        print(f"{'':<8} per pair, raw {layout} ({where[layout]}): "
              + ", ".join(f"{k.upper()} {v:.3f} ms ({seconds[k]:.2f}s)" for k, v in ms.items())
              + (f" = ITM {ms['itm'] / ms['clip']:.1f}x CLIP" if "itm" in ms else "") + f";  {pairs} pairs",
              flush=True)
    if stage_scoring:
        print(f"{'':<8} per pair, stage manifest (model seconds summed over workers): "
              + ", ".join(f"{k.upper()} {v['ms_per_pair']} ms ({v['pairs']} pairs, {v['seconds']}s)"
                          for k, v in stage_scoring.items()), flush=True)


def write_inputs(spark, work: Path, rows: list[tuple], workers: int) -> None:
    """The chain the stages read, written as the stages write it: a committed download output with
    the images (`downloaded/`, caption's input) and a committed caption output chained to it holding
    the given synthetic captions (`captioned/`, filter's input)."""
    from pyspark.sql import functions as F

    from capfilt.pipelines.io import empty_rejects
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import write_output
    from capfilt.pipelines.output import Counts, StageOutput, build_manifest, read_manifest
    from capfilt.pipelines.stage import PART, Chain
    from capfilt.schemas import DOWNLOADED

    download = StageOutput(str(work / "downloaded"), "download")
    download.begin()
    data = spark.createDataFrame([r[:-1] for r in rows], DOWNLOADED.spark_schema()).repartition(workers)
    download.commit(build_manifest(download, {}, write_output(download, definition("download"), data, empty_rejects(spark), len(rows),
                                                                 "zstd")[0]))
    chain = Chain.of(download.root, read_manifest(download.root), 50_000)  # the stages' default rows_per_part
    parts = None
    for i in range(len(chain.parts)):
        part = spark.read.parquet(*chain.files(i)).select("uid", F.lit(i).alias(PART))
        parts = part if parts is None else parts.unionByName(part)
    captioned = StageOutput(str(work / "captioned"), "caption")
    captioned.begin()
    synthetic = spark.createDataFrame([(r[0], r[-1]) for r in rows], "uid string, synthetic_captions array<string>")
    synthetic.join(parts, "uid").write.partitionBy(PART).parquet(captioned.data_dir)
    empty_rejects(spark).write.parquet(captioned.rejects_dir)
    captioned.commit(build_manifest(captioned, {}, Counts(len(rows), len(rows)),
                                    **chain.to_manifest("caption", captioned.root)))


def run_model_pass(spark, which: str, source: Path, settings: dict) -> None:
    """The stage's model pass alone: each part's view through the batch UDF, output discarded."""
    from capfilt.pipelines.config import CaptionSettings, Config, FilterSettings
    from capfilt.pipelines.output import read_manifest
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import Chain, infer, view

    cfg = Config(caption=CaptionSettings(**settings["caption"]), filter=FilterSettings(**settings["filter"]))
    passes = [definition(STAGE_OF[which]).model] + \
        ([definition("filter").model] if which == "fused" else [])
    chain = Chain.of(str(source), read_manifest(str(source)), 50_000)
    decoded = spark.sparkContext.accumulator(0)
    for part in range(len(chain.parts)):
        rows = view(spark, chain, part=part, images=True)
        infer(rows, cfg, passes, decoded).select("uid", "_inference").write.format("noop").mode("overwrite").save()


if __name__ == "__main__":
    main()
