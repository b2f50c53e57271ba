
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipelines.inputs import InputSpec, detect_format, read_pairs
from capfilt.schemas import PAIRS, SchemaError


def _rows():
    return pd.DataFrame({"url": ["http://h/1.jpg", "http://h/2.jpg", "http://h/1.jpg"],
                         "caption": ["a red circle", "a blue square", "a red circle"],
                         "license": ["cc-by", None, "cc0"]})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_format_reads_to_pairs_with_extras_kept(spark, tmp_path, fmt):
    df = _rows()
    path = tmp_path / f"meta.{fmt}"
    {"parquet": lambda: df.to_parquet(path), "csv": lambda: df.to_csv(path, index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True)}[fmt]()
    pairs = read_pairs(spark, InputSpec(str(path)))
    PAIRS.validate(pairs)
    rows = sorted(pairs.collect(), key=lambda r: (r.url, r.license or ""))
    assert [r.caption for r in rows] == ["a red circle", "a red circle", "a blue square"]
    assert "license" in pairs.columns
    # derived uid: stable, and identical url+caption rows share it (caught later as duplicates)
    assert rows[0].uid == rows[1].uid != rows[2].uid
    assert rows[0].uid == read_pairs(spark, InputSpec(str(path))).filter("url = 'http://h/1.jpg'").first().uid


def test_folder_and_glob_inputs_and_format_detection(spark, tmp_path):
    folder = tmp_path / "dump"
    folder.mkdir()
    for i in range(3):
        _rows().to_parquet(folder / f"part-{i}.parquet")
    (folder / "_stats.json").write_text("{}")  # img2dataset-style sidecars are ignored
    assert detect_format(str(folder)) == "parquet"
    assert read_pairs(spark, InputSpec(str(folder))).count() == 9
    assert read_pairs(spark, InputSpec(str(folder / "part-[01].parquet"))).count() == 6


def test_laion_preset_maps_its_columns(spark, tmp_path):
    df = pd.DataFrame({"SAMPLE_ID": [7, 8], "URL": ["http://h/a", "http://h/b"], "TEXT": ["x", "y"],
                       "WIDTH": [10, 20], "HEIGHT": [10, 20], "similarity": [0.3, 0.4],
                       "punsafe": [0.01, 0.2], "pwatermark": [0.1, 0.9]})
    df.to_parquet(tmp_path / "laion.parquet")
    pairs = read_pairs(spark, InputSpec.from_preset(str(tmp_path / "laion.parquet"), "laion"))
    assert sorted(r.uid for r in pairs.collect()) == ["7", "8"]
    # LAION's WIDTH/HEIGHT would clash (case-insensitively) with the downloaded width/height
    assert {"input_WIDTH", "input_HEIGHT", "similarity", "punsafe", "pwatermark"} <= set(pairs.columns)


def test_missing_columns_are_named(spark, tmp_path):
    pd.DataFrame({"link": ["x"], "alt": ["y"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(SchemaError) as e:
        read_pairs(spark, InputSpec(str(tmp_path / "m.parquet")))
    assert "no column 'url' for url (pass --url-col)" in str(e.value)
    assert "no column 'caption' for caption" in str(e.value)
    assert "the input's columns are: link, alt" in str(e.value)


def test_invalid_utf8_caption_is_repaired_not_fatal(spark, tmp_path):
    good, bad = b"a red circle", b"caf\xe9 \xff shapes"
    offsets = pa.array([0, len(good), len(good) + len(bad)], pa.int32())
    captions = pa.StringArray.from_buffers(2, offsets.buffers()[1], pa.py_buffer(good + bad))
    with pytest.raises(pa.ArrowInvalid):
        captions.validate(full=True)
    pq.write_table(pa.table({"url": ["http://h/1", "http://h/2"], "caption": captions}), tmp_path / "m.parquet")
    pairs = read_pairs(spark, InputSpec(str(tmp_path / "m.parquet")))
    # through Arrow, as Python workers receive it
    got = sorted(pairs.toArrow().column("caption").to_pylist())
    assert got == ["a red circle", "caf\ufffd \ufffd shapes"]


# --- hostile input: every row counted, names carried, one-line refusals -------------------------------

def _outcome(spark, spec):
    """read_pairs + precheck, as the download job runs them: (rows to fetch, {uid: reason} of rejects)."""
    from capfilt.pipelines.config import DownloadSettings
    from capfilt.pipelines.download import precheck, prechecked_rejects, to_fetch
    marked = precheck(read_pairs(spark, spec), DownloadSettings()).cache()
    try:
        return to_fetch(marked), prechecked_rejects(marked).collect()
    finally:
        marked.unpersist()


def test_a_folder_of_mixed_formats_is_read_whole(spark, tmp_path):
    folder = tmp_path / "dump"
    folder.mkdir()
    rows = _rows().assign(caption=[f"caption {i}" for i in range(3)])
    rows.assign(license=[1, 2, 3]).to_parquet(folder / "a.parquet")  # int here, text in the others
    rows.to_csv(folder / "b.csv", index=False)
    rows.to_json(folder / "c.jsonl", orient="records", lines=True)
    assert detect_format(str(folder)) == "mixed"
    pairs = read_pairs(spark, InputSpec(str(folder)))
    assert pairs.count() == 9
    assert sorted(r.license for r in pairs.collect() if r.license) == ["1", "2", "3", "cc-by", "cc-by", "cc0", "cc0"]


def test_hostile_column_names_are_carried_through_precheck_and_classify(spark, tmp_path):
    from capfilt.pipelines.config import DownloadSettings
    from capfilt.pipelines.download import classify
    from pyspark.sql import functions as F
    df = pd.DataFrame({"url": ["http://h/1", "http://h/2"], "caption": ["a", "b"], "dotted.name": [1, 2],
                       "back`tick": ["x", "y"], "with space": [0.5, None], "uid": ["u1", "u2"],
                       "input_uid": ["i1", "i2"], "Status": ["s", "t"], "": ["e", "f"]})
    df.to_parquet(tmp_path / "m.parquet")
    todo, rejects = _outcome(spark, InputSpec(str(tmp_path / "m.parquet")))
    assert rejects == []
    # input_uid keeps its name, so the input's uid (reserved) becomes input_uid_2
    assert todo.columns == ["uid", "url", "caption", "dotted.name", "back`tick", "with space", "input_uid_2",
                            "input_uid", "input_Status", ""]
    # img2dataset's status rows carry the extras; classify used to select them by bare name
    results = todo.select("*", F.lit("success").alias("status"), F.lit(None).cast("string").alias("error_message"),
                          F.lit(b"img").alias("jpg"), *[F.lit(8).alias(c) for c in
                                                         ("width", "height", "original_width", "original_height")],
                          F.lit("0" * 64).alias("sha256"))
    downloaded, failed = classify(results, todo, DownloadSettings(), complete=True)
    got = {r["url"]: r for r in downloaded.collect()}
    assert failed.count() == 0 and got["http://h/1"]["dotted.name"] == 1 and got["http://h/2"]["back`tick"] == "y"


def test_case_colliding_names_are_renamed_or_refused_in_one_line(spark, tmp_path):
    from capfilt.pipelines.inputs import check_input
    (tmp_path / "m.csv").write_text("url,caption,Caption,Note,note\nhttp://h/1,a,A,n,N\n")
    pairs = read_pairs(spark, InputSpec(str(tmp_path / "m.csv")))
    assert pairs.drop("_malformed").collect()[0].asDict() == {
        "uid": pairs.first().uid, "url": "http://h/1", "caption": "a", "input_Caption": "A", "Note": "n", "note_2": "N"}
    # Spark itself cannot read these apart from Parquet or JSON: refused, naming the columns
    pd.DataFrame({"url": ["u"], "caption": ["c"], "Caption": ["C"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"columns 'caption' and 'Caption' differ only by case") as e:
        check_input(InputSpec(str(tmp_path / "m.parquet")))
    assert "\n" not in str(e.value)
    (tmp_path / "m.jsonl").write_text('{"url": "u", "caption": "c", "Caption": "C"}\n')
    with pytest.raises(ValueError, match=r"cannot read .* as jsonl: .*COLUMN_ALREADY_EXISTS.*`caption`") as e:
        read_pairs(spark, InputSpec(str(tmp_path / "m.jsonl")))
    assert "\n" not in str(e.value)


def test_precheck_blank_captions_url_case_and_control_characters(spark, tmp_path):
    urls = ["http://h/1", "http://h/2", "HTTP://h/3", "Https://h/4", "http://h/5\x00x", "http://h/6\nx",
            "http://h/7\t", "http://h/8\x7f"]
    captions = ["ok", " \t\n", "ok", "ok", "ok", "ok", "ok", "ok"]
    pd.DataFrame({"url": urls, "caption": captions, "id": [str(i) for i in range(1, 9)]}).to_parquet(tmp_path / "m.parquet")
    pairs = pd.DataFrame({"url": ["http://h/9"] * 2, "caption": ["\u00a0\u200b\u3000", "\u2028"], "id": ["9", "10"]})
    pairs.to_parquet(tmp_path / "n.parquet")
    todo, rejects = _outcome(spark, InputSpec(str(tmp_path / "*.parquet"), id_col="id"))
    assert {r.uid: r.reason for r in rejects} == {"2": "empty_caption", "5": "invalid_url", "6": "invalid_url",
                                                   "8": "invalid_url", "9": "empty_caption", "10": "empty_caption"}
    # the scheme is lower-cased (urllib accepts any case, but dedup and checks compare text); whitespace trimmed
    assert sorted(r.url for r in todo.collect()) == ["http://h/1", "http://h/3", "http://h/7", "https://h/4"]


def test_a_broken_jsonl_line_is_a_malformed_row_and_no_corrupt_column_rides_along(spark, tmp_path):
    (tmp_path / "m.jsonl").write_text('{"url": "http://h/1", "caption": "a"}\n{"url": "http://h/2", "capt\n'
                                      '{"url": "http://h/3", "caption": "c"}\n')
    todo, rejects = _outcome(spark, InputSpec(str(tmp_path / "m.jsonl")))
    assert [(r.reason, r.detail) for r in rejects] == [("malformed_row", 'unparseable line: {"url": "http://h/2", "capt')]
    assert todo.columns == ["uid", "url", "caption"] and todo.count() == 2


@pytest.mark.slow
def test_csv_rows_with_wrong_field_counts_or_an_unterminated_quote_are_malformed_rows(spark, tmp_path):
    (tmp_path / "fields.csv").write_text('url,caption\nhttp://h/1,one\nhttp://h/2,two,extra\nhttp://h/3\n'
                                         'http://h/4,"multi\nline, legit"\n')
    todo, rejects = _outcome(spark, InputSpec(str(tmp_path / "fields.csv")))
    assert sorted((r.url, r.reason) for r in rejects) == [("http://h/2", "malformed_row"), ("http://h/3", "malformed_row")]
    assert "not 2 fields as in the header" in rejects[0].detail
    assert sorted(r.url for r in todo.collect()) == ["http://h/1", "http://h/4"]
    # 10 data lines; the quote opened on line 3 folds lines 3..8 into one field: that row must not pass
    lines = [f"http://h/{i},caption {i}" for i in range(10)]
    lines[2] = 'http://h/2,"caption 2'
    lines[7] = 'http://h/7,"caption 7"'
    (tmp_path / "quote.csv").write_text("url,caption\n" + "\n".join(lines) + "\n")
    (tmp_path / "eof.csv").write_text('url,caption\nhttp://h/0,zero\nhttp://h/1,"one\nhttp://h/2,two\n')
    for name, kept in (("quote.csv", 4), ("eof.csv", 1)):
        todo, rejects = _outcome(spark, InputSpec(str(tmp_path / name)))
        assert [r.reason for r in rejects] == ["malformed_row"], name
        assert "folded by an unterminated quote" in rejects[0].detail
        assert todo.count() == kept, name


def _file(path, text):
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "nope.parquet"), "does not exist"),
    (lambda p: str(p / "*.parquet"), "the glob matches no file"),
    (lambda p: _file(p / "e.parquet", ""), r"is empty \(0 bytes\)"),
    (lambda p: _file(p / "t.parquet", "url,caption\n"), "not a readable Parquet file"),
    (lambda p: _file(p / "d" / "notes.txt", "x").rsplit("/", 1)[0], "no .parquet, .csv or .jsonl files"),
    (lambda p: _file(p / "d" / "_SUCCESS", "").rsplit("/", 1)[0], "no .parquet, .csv or .jsonl files in"),
])
def test_unreadable_inputs_are_refused_in_one_line_without_spark(tmp_path, make, message):
    from capfilt.pipelines.inputs import check_input
    with pytest.raises(ValueError, match=message) as e:
        check_input(InputSpec(make(tmp_path)))
    assert "\n" not in str(e.value)


def test_the_download_job_refuses_a_missing_input_in_one_line(tmp_path, capsys):
    from capfilt.jobs.common import run
    from capfilt.jobs.download import main
    assert run(main, ["--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capfilt: error: input") and "does not exist" in err and "\n" not in err
    assert not any(tmp_path.iterdir()), "nothing written"
