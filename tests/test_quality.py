"""bench/quality.py's join with the ground truth, on the session's real curate output (120 rows):
its figures add up, and curation does what the benchmark reports at 10,000 rows."""
import importlib.util
import json

import pyarrow.parquet as pq

from capfilt.pipelines.report import SOURCES
from tests.conftest import ROOT


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curation_metrics_add_up_and_curation_removes_noise(curate_site, curated_out):
    quality = _quality()
    root, _, _ = curate_site
    truth = quality.load_truth(root)
    m = quality.curation_metrics(curated_out, truth)
    downloaded = pq.read_table(curated_out / "stages" / "download" / "data", columns=["uid"]).num_rows
    assert (m["input"], m["downloaded"]) == (120, downloaded)
    assert m["curated"] + m["rejected"] == m["input"]
    assert sum(k["downloaded"] for k in m["kinds"].values()) == downloaded
    # the downloaded rows carry about the noise the corpus was made with
    corpus = json.loads((root / "corpus.json").read_text())
    assert abs(m["noise_before"] - corpus["noise_share"]) < 0.05 and m["noise_before"] > 0.35
    assert m["noise_after"] <= 0.1 and m["clean_kept"] >= 0.85
    # every wrong primary caption is explained once, by its source and what it gets wrong
    assert abs(sum(m["wrong_primary"].values()) / m["curated"] - m["noise_after"]) < 1e-4
    assert all(key.split(": ")[0] in SOURCES for key in m["wrong_primary"])
    assert m["kinds"]["spam"]["web_caption_kept"] == 0 and m["kinds"]["generic"]["web_caption_kept"] == 0
    assert m["dedup"]["recall"] == 1.0 and m["dedup"]["planted_pairs_reaching_dedup"] > 0
    assert m["synthetic_exact_sampled"] > 0.85
