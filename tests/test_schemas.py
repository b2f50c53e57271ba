import pyarrow as pa
import pytest

from capfilt.schemas import CONTRACTS, PAIRS, REJECTS, SCORED, SchemaError, column_types


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_spark_and_arrow_schemas_come_from_one_definition(spark, name):
    contract = CONTRACTS[name]
    assert column_types(contract.spark_schema()) == column_types(contract.arrow_schema())
    assert list(column_types(contract.arrow_schema())) == contract.names
    contract.validate(contract.spark_schema())
    contract.validate(contract.arrow_schema())


def test_validator_names_every_missing_and_mistyped_column():
    actual = pa.schema([("uid", pa.int64()), ("url", pa.string()), ("image", pa.string()),
                        ("candidates", pa.list_(pa.string()))])
    with pytest.raises(SchemaError) as e:
        SCORED.validate(actual, where="somewhere/data")
    msg = str(e.value)
    assert "'scored' contract in somewhere/data" in msg
    assert "column 'uid' has type int64, expected string" in msg
    assert "column 'image' has type string, expected binary" in msg
    assert "column 'candidates' has type list<string>, expected list<struct<text:string" in msg
    assert "missing column 'caption' (expected string)" in msg
    assert "missing column 'image_embedding' (expected binary)" in msg
    # one problem per line, every one reported (not just the first)
    assert len(e.value.problems) == len(SCORED.names) - 1


def test_extra_columns_ride_along_except_in_rejects():
    with_extra = pa.schema(list(PAIRS.arrow_schema()) + [pa.field("punsafe", pa.float64())])
    PAIRS.validate(with_extra)
    with pytest.raises(SchemaError, match="unexpected column 'punsafe'"):
        REJECTS.validate(pa.schema(list(REJECTS.arrow_schema()) + [pa.field("punsafe", pa.float64())]))


def test_spark_dataframe_written_and_read_back_by_arrow_still_matches(spark, tmp_path):
    import pyarrow.parquet as pq
    row = ("u1", "http://x/a.jpg", "a red circle", b"\xff\xd8", 64, 64, 100, 80, "ab" * 32,
           ["a circle"], [("a red circle", "web", 0.3, True, 0.3, None)], 0.3, b"\x00\x3c" * 4)
    df = spark.createDataFrame([row], SCORED.spark_schema())
    SCORED.validate(df)
    df.write.parquet(str(tmp_path / "p"))
    SCORED.validate(pq.read_schema(next((tmp_path / "p").glob("*.parquet"))))


def test_spark_types_are_checked_too(spark):
    df = spark.createDataFrame([("u", 1, "c")], "uid string, url int, caption string")
    with pytest.raises(SchemaError, match="column 'url' has type int32, expected string"):
        PAIRS.validate(df)
