"""The caption stage on Spark: captions equal calling the model directly with each row's seed,
reruns are identical, and images that do not decode become named rejects."""
import io

import pytest
import torch
from PIL import Image

from capfilt.pipelines.caption import caption, split_captioned
from capfilt.pipelines.config import CaptionSettings
from capfilt.schemas import CAPTIONED, DOWNLOADED, REJECTS
from capfilt.udfs.caption import row_seed
from helpers import solid


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A random-init BLIP captioner saved with save_pretrained (the loader's local-folder path)."""
    from transformers import BlipForConditionalGeneration

    from capfilt.lab.tokens import save_blip_processor
    from capfilt.lab.train_captioner import MEAN, STD, blip_config
    folder = tmp_path_factory.mktemp("tiny-blip")
    processor = save_blip_processor(folder, 64, MEAN, STD)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(blip_config(processor.tokenizer, width=32, vision_layers=1, text_layers=1))
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _downloaded(spark, images):
    rows = [(uid, f"http://h/{uid}", "web", image, 64, 64, 64, 64, "0" * 64) for uid, image in images]
    return spark.createDataFrame(rows, DOWNLOADED.spark_schema())


@pytest.mark.slow
def test_spark_captions_equal_the_model_called_directly_with_each_rows_seed(spark, tiny_blip):
    from capfilt.udfs.models import load_captioner
    images = [(f"u{i}", solid(c, fmt="PNG")) for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)])]
    settings = CaptionSettings(model=tiny_blip, num_captions=3, max_new_tokens=8, batch_size=2, device="cpu")
    marked = caption(_downloaded(spark, images).repartition(2), settings, seed=11)
    captioned, rejects = split_captioned(marked)
    CAPTIONED.validate(captioned)
    got = {r.uid: r.synthetic_captions for r in captioned.collect()}
    assert rejects.count() == 0

    direct = load_captioner(tiny_blip, "cpu")
    for uid, data in images:
        expected = direct.generate([Image.open(io.BytesIO(data)).convert("RGB")], num_captions=3, top_p=0.9,
                                   seeds=[row_seed(uid, 11)], max_new_tokens=8)[0]
        assert got[uid] == expected
    rerun = {r.uid: r.synthetic_captions for r in split_captioned(
        caption(_downloaded(spark, images).coalesce(1), settings, seed=11))[0].collect()}
    assert rerun == got, "same seed, other partitioning and batch size: same captions"
    other_seed = {r.uid: r.synthetic_captions for r in split_captioned(
        caption(_downloaded(spark, images), settings, seed=12))[0].collect()}
    assert other_seed != got


@pytest.mark.slow
def test_undecodable_images_are_rejected_with_a_reason(spark, tiny_blip):
    settings = CaptionSettings(model=tiny_blip, num_captions=1, max_new_tokens=4, device="cpu")
    rows = [("ok", solid((1, 2, 3), fmt="PNG")), ("empty", b""), ("html", b"<html></html>"), ("cut", solid((9, 9, 9), fmt="PNG")[:60])]
    captioned, rejects = split_captioned(caption(_downloaded(spark, rows), settings))
    REJECTS.validate(rejects)
    assert [r.uid for r in captioned.collect()] == ["ok"]
    assert {r.uid: r.reason for r in rejects.collect()} == {"empty": "undecodable_image", "html": "undecodable_image",
                                                           "cut": "undecodable_image"}


@pytest.mark.slow
def test_zero_captions_is_filter_only_no_captioner_loaded_images_still_checked(spark, tmp_path):
    # The model reference names nothing: loading it would fail, so the stage must not load it.
    settings = CaptionSettings(model=str(tmp_path / "no-such-model"), num_captions=0, device="cpu")
    rows = [("ok", solid((1, 2, 3), fmt="PNG")), ("cut", solid((9, 9, 9), fmt="PNG")[:60])]
    captioned, rejects = split_captioned(caption(_downloaded(spark, rows), settings))
    CAPTIONED.validate(captioned)
    assert [(r.uid, r.synthetic_captions) for r in captioned.collect()] == [("ok", [])]
    assert {r.uid: r.reason for r in rejects.collect()} == {"cut": "undecodable_image"}


@pytest.mark.slow
def test_a_killed_caption_run_resumes_from_its_finished_parts(spark, tiny_blip, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from capfilt.pipelines.io import empty_rejects
    from capfilt.pipelines.registry import definition
    from capfilt.pipelines.stage import write_output
    WHOLE = definition("download")
    from capfilt.pipelines.output import StageOutput, build_manifest, read_manifest
    from tests.conftest import ROOT

    images = [(f"u{i:02d}", solid((i * 9 % 256, 40, 200 - i), fmt="PNG")) for i in range(24)]
    source = StageOutput(str(tmp_path / "download"), "download")
    source.begin()
    counts = write_output(source, WHOLE, _downloaded(spark, images).repartition(8), empty_rejects(spark), len(images))[0]
    source.commit(build_manifest(source, {}, counts))
    from capfilt.pipelines.stage import download_parts
    total = len(download_parts(str(tmp_path / "download" / "data"), 3))
    assert total >= 4
    args = ["--input", str(tmp_path / "download"), "--output", str(tmp_path / "caption"),
            "--set", f"caption.model={tiny_blip}", "--set", "caption.rows_per_part=3", "--set", "caption.num_captions=2",
            "--set", "caption.max_new_tokens=6", "--set", "caption.device=cpu", "--set", "spark.master=local[1]",
            "--set", "spark.conf={spark.ui.enabled: 'false'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "capfilt.jobs.cli", "caption", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / ".caption.inprogress" / "model"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(work.glob("capfilt_part=*/_SUCCESS"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("capfilt_part=*/_SUCCESS")))
    assert 2 <= finished < total and not (tmp_path / "caption").exists()
    subprocess.run([sys.executable, "-m", "capfilt.jobs.cli", "caption", *args], env=env, check=True, capture_output=True,
                   timeout=300)
    manifest = read_manifest(tmp_path / "caption")
    assert manifest["parts"] == {"total": total, "reused_from_a_killed_run": finished}
    cost = manifest["models"]["captioning"]  # the killed run's parts keep the seconds they cost
    assert cost["images"] == 24 and cost["captions"] == 48 and cost["ms_per_image"] > 0
    got = {r.uid: r.synthetic_captions for r in spark.read.parquet(str(tmp_path / "caption" / "data")).collect()}
    assert "image" not in spark.read.parquet(str(tmp_path / "caption" / "data")).columns  # images stay in download
    settings = CaptionSettings(model=tiny_blip, num_captions=2, max_new_tokens=6, device="cpu")
    clean = {r.uid: r.synthetic_captions for r in split_captioned(caption(_downloaded(spark, images), settings))[0].collect()}
    assert got == clean, "resumed output equals a clean run's"
