"""The prefilter stage in a real download: LAION-shaped metadata, rules by config, rows never fetched."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.download import main as download
from capfilt.world.corpus import make_web_corpus
from capfilt.world.server import serve


@pytest.fixture(scope="module")
def laion_site(tmp_path_factory):
    """A small web corpus served on loopback, and LAION-shaped metadata for it: URL, TEXT, SAMPLE_ID,
    WIDTH/HEIGHT (int64), similarity, punsafe and pwatermark (float64, with nulls)."""
    root = tmp_path_factory.mktemp("prefilter-world")
    make_web_corpus(root, n=60, seed=21, slow_ms=0, burst=0)
    truth = pq.read_table(root / "truth.parquet").to_pandas()
    truth = truth[truth["url_path"].str.startswith("/") & truth["kind"].isin(["clean", "web_phrasing"])]
    truth = truth.drop_duplicates("id").reset_index(drop=True).head(40)
    n = len(truth)
    rng = np.random.default_rng(0)
    punsafe = rng.uniform(0, 0.2, n)
    pwatermark = rng.uniform(0, 0.3, n)
    similarity = rng.uniform(0.3, 0.4, n)
    width, height = np.full(n, 640, np.int64), np.full(n, 480, np.int64)
    captions = [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in truth["caption"]]
    expected = {}  # SAMPLE_ID -> reason
    punsafe[0], expected[0] = 0.93, "punsafe"
    pwatermark[1], expected[1] = 0.95, "pwatermark"
    similarity[2], expected[2] = 0.1, "low_similarity"
    width[3], expected[3] = 50, "image_too_small"
    width[4], height[4], expected[4] = 3000, 300, "aspect_ratio"
    captions[5], expected[5] = "bird", "caption_too_short"
    captions[6], expected[6] = captions[6] + " forbidden words here", "blocklist"
    captions[7], expected[7] = "Ein roter Kreis und ein blaues Quadrat auf einem grauen Hintergrund", "language"
    punsafe[8] = np.nan  # a null value fails no rule
    table = pa.table({
        "SAMPLE_ID": pa.array([f"s{i}" for i in range(n)]),
        "URL": pa.array(list(truth["url_path"])),  # the base URL is added once the server runs
        "TEXT": pa.array(captions), "WIDTH": pa.array(width), "HEIGHT": pa.array(height),
        "similarity": pa.array(similarity), "punsafe": pa.array(punsafe, from_pandas=True),
        "pwatermark": pa.array(pwatermark)})
    with serve(root / "site") as server:
        table = table.set_column(1, "URL", pa.array([server.base_url.rstrip("/") + p for p in truth["url_path"]]))
        pq.write_table(table, root / "laion.parquet")
        yield root, server, {f"s{i}": r for i, r in expected.items()}, truth


RULES = ["prefilter.max_punsafe=0.5", "prefilter.max_pwatermark=0.8", "prefilter.min_similarity=0.2",
         "prefilter.min_width=100", "prefilter.max_aspect_ratio=4", "prefilter.min_caption_words=2",
         "prefilter.blocklist=[forbidden]", "prefilter.languages=[en]"]


def _run(metadata, out, server, rules, *more):
    sets = [x for rule in rules for x in ("--set", rule)]
    return download(["--input", str(metadata), "--preset", "laion", "--output", str(out), "--no-progress",
                     "--allow-host", f"127.0.0.1:{server.port}", "--set", "download.min_image_size=0",
                     "--set", "download.image_size=64", *sets, *more])


@pytest.mark.slow
def test_prefiltered_rows_are_rejected_with_reasons_and_never_requested(laion_site, tmp_path, spark):
    root, server, expected, truth = laion_site
    before = len(server.requests)
    assert _run(root / "laion.parquet", tmp_path / "dl", server, RULES) == 0
    requested = {path for path, _ in server.requests[before:]}
    rejects = spark.read.parquet(str(tmp_path / "dl" / "rejects")).toPandas()
    pre = rejects[rejects["stage"] == "prefilter"].set_index("uid")
    assert pre["reason"].to_dict() == expected
    assert pre.loc["s0", "detail"] == "punsafe 0.93 > 0.5"
    assert "forbidden" in pre.loc["s6", "detail"] and pre.loc["s7", "detail"].startswith("language de")
    for uid in expected:  # the server never saw a request for a prefiltered row
        assert truth.loc[int(uid[1:]), "url_path"] not in requested
    manifest = json.loads((tmp_path / "dl" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rejected"]["prefilter"] == {r: 1 for r in expected.values()}
    assert counts["input"] == len(truth) == counts["output"] + counts["rejected_total"]
    assert manifest["prefilter"]["skipped"] == {}
    assert set(manifest["prefilter"]["active"]) == {r.split("=")[0].split(".")[1] for r in RULES}


@pytest.mark.slow
def test_rules_whose_columns_are_absent_are_skipped_and_named(laion_site, tmp_path, spark):
    root, server, expected, truth = laion_site
    bare = pq.read_table(root / "laion.parquet").select(["SAMPLE_ID", "URL", "TEXT"])
    pq.write_table(bare, tmp_path / "bare.parquet")
    assert _run(tmp_path / "bare.parquet", tmp_path / "dl", server, RULES) == 0
    manifest = json.loads((tmp_path / "dl" / "manifest.json").read_text())
    skipped = manifest["prefilter"]["skipped"]
    assert set(skipped) == {"max_punsafe", "max_pwatermark", "min_similarity", "min_width", "max_aspect_ratio"}
    assert "punsafe" in skipped["max_punsafe"] and "absent" in skipped["max_punsafe"]
    # the caption rules still ran
    assert manifest["counts"]["rejected"]["prefilter"] == {"caption_too_short": 1, "blocklist": 1, "language": 1}


@pytest.mark.slow
def test_changing_only_prefilter_settings_refilters_without_fetching_anything_again(laion_site, tmp_path, spark,
                                                                                   refused_before_spark, capsys):
    """The committed download is re-filtered: rows the new rules drop leave the records for the rejects, rows
    only the old rules dropped are fetched now, and nothing fetched before is requested again (server log)."""
    root, server, expected, truth = laion_site
    out = tmp_path / "dl"
    assert _run(root / "laion.parquet", out, server, RULES) == 0
    first = json.loads((out / "manifest.json").read_text())
    data = spark.read.parquet(str(out / "data")).select("uid").toPandas()
    metadata = pq.read_table(root / "laion.parquet").to_pandas().set_index("SAMPLE_ID")
    newly_dropped = {uid for uid in data["uid"] if metadata.loc[uid, "pwatermark"] > 0.25}
    assert newly_dropped and "s0" not in set(data["uid"]) and metadata.loc["s0", "pwatermark"] <= 0.25
    # The punsafe rule goes (s0 may be fetched now), a stricter watermark rule comes.
    rules = [r for r in RULES if "punsafe" not in r and "pwatermark" not in r] + ["prefilter.max_pwatermark=0.25"]
    before = len(server.requests)
    assert _run(root / "laion.parquet", out, server, rules) == 0
    requested = [path for path, _ in server.requests[before:] if not path.startswith("/robots")]
    assert requested == [truth.loc[0, "url_path"]], "only the row the old rules alone dropped is fetched"
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == first["counts"]["input"] == counts["output"] + counts["rejected_total"]
    rejects = spark.read.parquet(str(out / "rejects")).toPandas().set_index("uid")
    pre = rejects[rejects["stage"] == "prefilter"]
    assert newly_dropped <= set(pre.index) and "s0" not in rejects.index
    assert all(pre.loc[uid, "reason"] == "pwatermark" for uid in newly_dropped)
    assert set(spark.read.parquet(str(out / "data")).select("uid").toPandas()["uid"]) == \
        set(data["uid"]) - newly_dropped | {"s0"}
    assert manifest["refilters"] == [{"fetched": 1, "dropped": len(newly_dropped)}]
    # The same settings again: nothing to do.
    before = len(server.requests)
    assert _run(root / "laion.parquet", out, server, rules) == 0
    assert len(server.requests) == before
    # A download made before the kept input held the prefiltered rows cannot be re-filtered, not even after a
    # retry (which keeps its input as it was): one line, nothing requested, the committed output unchanged.
    manifest.pop("input_holds")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert _run(root / "laion.parquet", out, server, rules, "--retry-failed") == 0
    assert json.loads((out / "manifest.json").read_text())["input_holds"] == "prefiltered"
    from capfilt.jobs.common import run
    before = len(server.requests)
    assert run(lambda argv: _run(*argv), [root / "laion.parquet", out, server, RULES]) == 2
    assert len(server.requests) == before and json.loads((out / "manifest.json").read_text())["refilters"]
    # curate's plan asks the download the same, before Spark starts.
    import shutil

    from capfilt.jobs.curate import main as curate
    shutil.copytree(out, tmp_path / "cur" / "stages" / "download")
    capsys.readouterr()
    err = refused_before_spark(curate, ["--input", root / "laion.parquet", "--preset", "laion", "--output",
                                        tmp_path / "cur", "--no-progress", "--allow-host", f"127.0.0.1:{server.port}",
                                        "--set", "download.min_image_size=0", "--set", "download.image_size=64",
                                        *[x for rule in RULES for x in ("--set", rule)]], tmp_path / "cur")
    assert "downloaded by an older capfilt" in err and len(server.requests) == before


def test_prefilter_is_a_step_of_the_curate_funnel():
    from capfilt.pipelines.publish import split_filters as split_prefilter
    stages = {"download": {"counts": {"input": 10, "output": 6, "rejected_total": 4,
                                      "rejected": {"prefilter": {"punsafe": 3}, "download": {"http_404": 1}}},
                           "timings": {"prefilter": 1.5}},
              "caption": {"counts": {"input": 6, "output": 6, "rejected": {}}}}
    split = split_prefilter(stages)
    assert list(split) == ["prefilter", "download", "caption"]
    assert split["prefilter"]["counts"] == {"input": 10, "output": 7, "rejected": {"prefilter": {"punsafe": 3}},
                                            "rejected_total": 3}
    assert split["download"]["counts"]["input"] == 7 and split["download"]["counts"]["rejected_total"] == 1
    assert split["prefilter"]["seconds"] == 1.5


@pytest.mark.parametrize("rule, says", [("prefilter.languages=[english]", "'english' is not a language code"),
                                        ("prefilter.blocklist_patterns=['(unclosed']", "(unclosed"),
                                        ("prefilter.blocklist_patterns=['(?<=a)b']", "needs a backtracking")])
def test_bad_prefilter_settings_are_one_line_before_spark(laion_site, tmp_path, capsys, rule, says):
    from capfilt.jobs.common import run
    root, server, _, _ = laion_site
    before = len(server.requests)
    assert run(lambda argv: _run(*argv), [root / "laion.parquet", tmp_path / "dl", server, [rule]]) == 2
    assert says in capsys.readouterr().err and len(server.requests) == before
    assert not (tmp_path / "dl").exists()
