"""`capfilt export OUT --format webdataset|csv|json --to DIR`: training manifests from a curated output.

webdataset: tar shards (jpg/png, txt, json) + shards.txt + export.json (the --train-data pattern and
--train-num-samples for open_clip training); csv: images as files + train.csv (filepath, title,
tab-separated: open_clip's csv loader); json: images as files + annotations.json in the LAVIS/BLIP
format. docs/output.md shows the training commands.
"""
import argparse
import shlex
import sys

from capfilt.jobs.common import add_config_args, config_from_args, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="capfilt export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="a finished `capfilt curate` output")
    p.add_argument("--format", required=True, choices=["webdataset", "csv", "json"])
    p.add_argument("--to", required=True, metavar="DIR", help="folder to write (must not exist, or be empty)")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="webdataset samples per tar (and rows "
                                                                         "per Spark task for every format)")
    add_config_args(p)
    args = p.parse_args(argv)
    if args.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    cfg = config_from_args(args)
    from capfilt.pipelines.export import check_target, export
    from capfilt.pipelines.output import check_current, read_manifest
    check_current(args.out, read_manifest(args.out))  # refuses an unfinished or stale OUT before starting Spark,
    check_target(args.out, args.to, cfg.output.overwrite)  # and a target that is not safe to write

    from capfilt.pipelines.output import OutputLock
    from capfilt.pipelines.session import spark_session
    # Two exports into one folder would share its work folder; a curate rewriting OUT meanwhile would
    # pull the files from under the export. Both locks name the resolved folders (a link to OUT too).
    with OutputLock(args.to), OutputLock(args.out, shared=True):
        spark = spark_session(cfg.spark)
        summary = export(spark, args.out, args.format, args.to, args.samples_per_shard, cfg.output.overwrite)
    print(f"{args.to}: {summary['samples']} samples as {args.format}")
    # Arguments to paste into a shell: every path quoted (spaces, quotes; the brace pattern is open_clip's).
    if args.format == "webdataset":
        print(f"  open_clip:  --train-data {shlex.quote(summary['train_data'])} "
              f"--train-num-samples {summary['train_num_samples']} --dataset-type webdataset")
    elif args.format == "csv":
        print(f"  open_clip:  --train-data {shlex.quote(summary['file'])} --dataset-type csv "
              f"--csv-img-key filepath --csv-caption-key title --csv-separator $'\\t'")
        if summary["captions_pandas_reads_as_missing"]:
            print(f"  warning: {summary['captions_pandas_reads_as_missing']} captions (e.g. 'NA', 'null', "
                  f"'None') are read as missing by pandas, so open_clip's csv loader trains on 'nan' for them; "
                  f"the webdataset export keeps them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
