"""`capfilt dedup` / `spark-submit jobs/dedup.py`: drop exact and near-duplicate pairs.

Reads a committed filter output (scored records), writes curated records ready for pretraining
(one survivor per duplicate group, which may inherit the group's kept captions) + rejects with the
reason and `duplicate_of`. Evidence: identical image bytes, near-duplicate images (faiss on the
filter's embeddings, confirmed on thumbnails), near-duplicate web captions (MinHash-LSH, identical
to datasketch) together with similar images. docs/dedup.md has the policy.
"""
import sys

from jobs.common import check_output_path, config_from_args, reuse_committed, run, stage_parser


def main(argv=None) -> int:
    from pipelines.dedup import REASONS, STAGE, dedup
    from pipelines.io import read_stage, write_stage
    from pipelines.output import OutputLock, StageOutput, build_manifest, read_manifest
    from pipelines.provenance import source_of
    from pipelines.session import spark_session
    from schemas import CURATED, SCORED

    args = stage_parser("capfilt dedup", __doc__).parse_args(argv)
    cfg = config_from_args(args)
    check_output_path(args.output, args.input)
    source = source_of(read_manifest(args.input))  # refuses an uncommitted input
    out = StageOutput(args.output, STAGE, overwrite=cfg.output.overwrite)
    if reuse_committed(out, cfg, STAGE, source):
        return 0
    with OutputLock(args.output):
        out.begin(force=True)
        spark = spark_session(cfg.spark)
        print(f"Spark UI: {spark.sparkContext.uiWebUrl}", flush=True)
        scored = read_stage(spark, args.input, SCORED)
        n_input = scored.count()
        curated, rejects = dedup(scored, cfg.dedup, cfg.seed)
        CURATED.validate(curated, where="dedup output")
        counts = write_stage(out, curated, rejects, n_input, cfg.output.compression)
        out.commit(build_manifest(out, cfg.to_dict(), counts, reasons=REASONS, source=source))
    print(f"{args.output}: {counts.input} rows in, {counts.output} out, {counts.rejected_total} rejected "
          f"{counts.rejected.get(STAGE, {})}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
