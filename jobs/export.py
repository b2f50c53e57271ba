"""`capfilt export OUT --format webdataset|csv|json --to DIR`: training manifests from a curated output.

webdataset: tar shards (jpg/png, txt, json) + shards.txt + export.json (the --train-data pattern and
--train-num-samples for open_clip training); csv: images as files + train.csv (filepath, title,
tab-separated: open_clip's csv loader); json: images as files + annotations.json in the LAVIS/BLIP
format. --captions chooses what each sample trains on: primary (the best kept caption), web, synthetic,
all (every kept caption its own sample, as BLIP trains) or mix (a seeded share of synthetic captions,
--synthetic-share). docs/output.md shows the training commands.
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
    p.add_argument("--captions", default="primary", choices=["primary", "web", "synthetic", "all", "mix"],
                   help="the caption of each sample: primary (default), the kept web or best kept synthetic one "
                        "(rows without one are left out), all kept ones as separate samples, or mix")
    p.add_argument("--synthetic-share", type=float, metavar="P",
                   help="mix: the share of rows drawn to train on their synthetic caption (default 0.8, "
                        "Recap-DataComp-1B's best for retrieval), the rest on their web caption")
    add_config_args(p)
    args = p.parse_args(argv)
    from capfilt.pipelines.export import check_options, check_target, export
    check_options(args.format, args.samples_per_shard, args.captions, args.synthetic_share)
    cfg = config_from_args(args)
    from capfilt.pipelines.output import check_current, read_manifest
    check_current(args.out, read_manifest(args.out))  # refuses an unfinished or stale OUT before starting Spark,
    check_target(args.out, args.to, cfg.output.overwrite)  # and a target that is not safe to write

    from capfilt.pipelines.output import OutputLock
    from capfilt.pipelines.session import spark_session
    # Two exports into one folder would share its work folder; a curate rewriting OUT meanwhile would
    # pull the files from under the export. Both locks name the resolved folders (a link to OUT too).
    with OutputLock(args.to), OutputLock(args.out, shared=True):
        spark = spark_session(cfg.spark)
        summary = export(spark, args.out, args.format, args.to, args.samples_per_shard, cfg.output.overwrite,
                         args.captions, args.synthetic_share, cfg.seed)
    mix = summary["captions"]
    print(f"{args.to}: {summary['samples']} samples as {args.format} ({mix['web']} web captions, "
          f"{mix['synthetic']} synthetic)")
    if mix.get("rows_left_out"):
        print(f"  {mix['rows_left_out']} of {mix['rows']} curated rows kept no {args.captions} caption: left out")
    if mix.get("fallbacks"):
        print(f"  {mix['fallbacks']} rows drawn for one source kept none of it: they train on the other")
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
