"""The stage runner's view: download rows joined with what later stages added."""
from capfilt.pipelines.stage import PART, Chain, view


def test_an_input_column_named_part_rides_along_untouched(spark, tmp_path):
    download = tmp_path / "download"
    spark.createDataFrame([("a", "http://x/a.png", "a cat", b"x", 3)],
                          "uid string, url string, caption string, image binary, part int") \
        .write.parquet(str(download / "data"))
    chain = Chain.of(str(download), {"stage": "download"}, rows_per_part=10)
    row = view(spark, chain, part=0, images=True).collect()[0]
    assert row["part"] == 3 and row[PART] == 0  # the input's column and the runner's part number
