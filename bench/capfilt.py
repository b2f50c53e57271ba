"""Caption and filter stages vs raw loops, side by side in one run (not a timed test).

Same images (shapes world), same model, same total threads: the stage runs in Spark local[W] with
T torch threads per worker; the raw loop is one process with W*T threads doing decode + preprocess +
model calls in batches, nothing else. Prints rows/s of each and the ratio stage / raw (goal >= 0.90).

    .venv/bin/python bench/capfilt.py [--rows 2000] [--workers 2] [--threads 1] [--which filter,caption]
                                      [--clip vit-b-32] [--captioner blip-base]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
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


def raw_filter(images: list[bytes], captions: list[str], synthetic: list[list[str]], ref: str, batch: int) -> None:
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


def raw_caption(images: list[bytes], ref: str, k: int, batch: int, max_new_tokens: int) -> None:
    from PIL import Image

    from capfilt.udfs.models import load_captioner
    captioner = load_captioner(ref, "cpu")
    for start in range(0, len(images), batch):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + batch]]
        captioner.generate(pil, num_captions=k, top_p=0.9, seeds=list(range(start, start + len(pil))),
                           max_new_tokens=max_new_tokens, batch_size=batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per Spark worker")
    ap.add_argument("--which", default="filter,caption")
    ap.add_argument("--clip", default=None, help="default: the shapes-world CLIP in models/; 'vit-b-32': the "
                                                 "default architecture, random weights")
    ap.add_argument("--captioner", default=None, help="default: the shapes-world captioner in models/; 'blip-base': "
                                                      "BLIP-base's size with random weights")
    ap.add_argument("--captions", type=int, default=5, help="synthetic captions per image")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from capfilt.jobs.caption import main as caption_main
    from capfilt.jobs.filter import main as filter_main
    from capfilt.pipelines.config import SparkSettings
    from capfilt.pipelines.output import Counts, StageOutput, build_manifest
    from capfilt.pipelines.session import spark_session
    from capfilt.udfs.models import SHAPES_CAPTIONER, SHAPES_CLIP
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
    from capfilt.schemas import CAPTIONED
    df = spark.createDataFrame(rows, CAPTIONED.spark_schema()).repartition(args.workers)
    stage_in = StageOutput(str(work / "captioned"), "caption")
    stage_in.begin()
    df.write.parquet(stage_in.data_dir)
    spark.createDataFrame([], "uid string, url string, caption string, stage string, reason string, detail string, "
                              "duplicate_of string").write.parquet(stage_in.rejects_dir)
    stage_in.commit(build_manifest(stage_in, {}, Counts(args.rows, args.rows)))

    common = ["--set", f"spark.master=local[{args.workers}]"]
    torch.set_num_threads(args.workers * args.threads)
    print(f"rows={args.rows}  stage: local[{args.workers}] x {args.threads} torch thread(s);  "
          f"raw loop: 1 process x {torch.get_num_threads()} threads", flush=True)
    for which in args.which.split(","):
        timings = {}
        for attempt in ("warm-up", "measured"):
            start = time.perf_counter()
            if which == "filter":
                raw_filter(images, captions, synthetic, clip_ref, 64)
            else:
                raw_caption(images, cap_ref, args.captions, 32, 30)
            timings["raw"] = time.perf_counter() - start
            start = time.perf_counter()
            out = str(work / f"{which}-{attempt}")
            if which == "filter":
                filter_main(["--input", str(work / "captioned"), "--output", out, *common,
                             "--set", f"filter.model={clip_ref}", "--set", f"filter.torch_threads={args.threads}",
                             "--set", "filter.threshold=-1", "--set", "filter.device=cpu"])
            else:
                caption_main(["--input", str(work / "captioned"), "--output", out, *common,
                              "--set", f"caption.model={cap_ref}", "--set", f"caption.torch_threads={args.threads}",
                              "--set", f"caption.num_captions={args.captions}", "--set", "caption.device=cpu"])
            timings["stage"] = time.perf_counter() - start
            print(f"  {which} {attempt}: raw {timings['raw']:.2f}s, stage {timings['stage']:.2f}s", flush=True)
        raw, stage = args.rows / timings["raw"], args.rows / timings["stage"]
        print(f"{which:<8} raw loop {raw:8.1f} rows/s   stage {stage:8.1f} rows/s   ratio stage/raw = "
              f"{stage / raw:.3f}  (goal >= 0.90)", flush=True)


if __name__ == "__main__":
    main()
