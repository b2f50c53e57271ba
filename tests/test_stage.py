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


def test_the_gpu_path_returns_its_rows_without_the_image_bytes_it_read(spark):
    # The cluster GPU path is mapInPandas (Spark refuses its ResourceProfile in local mode, so the
    # function and schema run here without one): only the non-image columns and the result come back.
    import pandas as pd
    from pyspark.sql.types import StringType, StructField, StructType

    from capfilt.pipelines.inference import PASS, MapBatches, kept_fields
    df = spark.createDataFrame([("a", b"xyz", "a cat"), ("b", b"xy", "a dog")],
                               "uid string, image binary, caption string")
    kept = kept_fields(df.schema, ["image", "caption"])
    assert [f.name for f in kept] == ["uid", "caption"]
    result = StructType([StructField("n", StringType(), True)])
    def sizes(frame):
        return pd.DataFrame({"n": [f"{len(i)}:{c}" for i, c in zip(frame["image"], frame["caption"])]})
    batch = MapBatches(sizes, ["image", "caption"], [f.name for f in kept])
    out = df.mapInPandas(batch, StructType(kept + [StructField(PASS, result, True)]))
    assert out.columns == ["uid", "caption", PASS]
    assert sorted((r["uid"], r[PASS]["n"]) for r in out.collect()) == [("a", "3:a cat"), ("b", "2:a dog")]
