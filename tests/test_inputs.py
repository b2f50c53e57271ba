
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.inputs import InputSpec, detect_format, read_pairs
from schemas import PAIRS, SchemaError


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
