"""`capfilt inspect OUT [--html FILE]`: look at a curated output before trusting it.

Prints the funnel (rows after each stage, rejected rows per stage and reason), score quantiles and
kept fraction of web vs synthetic captions, the curated files, and the download failure map (fetched
rows by outcome, by the detail's code and HTTP status, and the hosts with the most failures). --html
writes one self-contained page: funnel chart, score histograms, the failure map, and a gallery of kept
and dropped samples (thumbnails, captions, scores, reasons) filterable by reason. Every caption, URL
and host is escaped.
"""
import argparse
import os
import sys
from pathlib import Path

from capfilt.jobs.common import add_config_args, config_from_args, run


def print_report(report: dict) -> None:
    from capfilt.pipelines.report import plain, stage_table
    funnel, scores = report["funnel"], report["scores"]
    finished = f", finished {report['finished_at']}" if report.get("finished_at") else ""
    print(f"{report['root']}: {funnel['after'][0][1]} rows in, {funnel['curated']} curated "
          f"({funnel['kept_fraction']:.1%} kept){finished}")
    print("\nfunnel (rows after each stage; rejected rows per reason)")
    for stage, n in funnel["after"]:
        print(f"  {stage:<13} {n:>10}")
        for reason, rows in sorted(funnel["rejected"].get(stage, {}).items(), key=lambda kv: -kv[1]):
            print(f"    - {plain(reason):<29} {rows:>8}")
    if scores["sources"]:
        quantiles = next(iter(scores["sources"].values()))["quantiles"]
        print("\ncaption scores of the curated rows' candidates (kept: fraction of captions kept)")
        print(f"  {'source':<20} {'captions':>9} {'kept':>6} " + " ".join(f"{'p%d' % round(q * 100):>7}" for q in quantiles))
        for name, s in scores["sources"].items():
            print(f"  {name:<20} {s['n']:>9} {s['kept_fraction']:>6.3f} "
                  + " ".join(f"{v:>7.4f}" for v in s["quantiles"].values()))
    print("\nstages (rows/s: rows in per second; MB: 2**20 bytes of Parquet written; model passes: rows per model)")
    print("\n".join(stage_table(report["stages"])))
    print("\ncurated files")
    for shard in report["shards"]:
        print(f"  {plain(shard['file']):<60} {shard['rows']:>9} rows {shard['bytes']:>13,} bytes")
    print_sections(report, registry_sections())


def registry_sections(name: str | None = None) -> list:
    """The report sections (Stage.inspect) of the chain's stages, or of the stage `name` alone."""
    from capfilt.pipelines import registry
    return [section for stage in registry.stages() if name in (None, stage.name) for section in stage.inspect]


def print_sections(report: dict, sections: list) -> None:
    found = report.get("sections") or {}
    for section in sections:
        if section.key in found:
            print("\n" + "\n".join(section.text(found[section.key], report["root"])))


def check_writable(file: Path, option: str) -> None:
    """Refuse, before any work, a file that could not be written at the end."""
    folder = file.parent
    if file.is_dir():
        raise ValueError(f"{option} {file} is a folder: name a file")
    if not folder.exists():
        raise ValueError(f"{option} {file}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{option} {file}: {folder} is not a folder")
    if not os.access(file if file.exists() else folder, os.W_OK):
        raise ValueError(f"{option} {file}: {file if file.exists() else folder} is not writable")


def is_report(file: Path) -> bool:
    """An earlier page of `capfilt inspect --html` (the only file --html replaces)."""
    try:
        with open(file, "rb") as f:
            head = f.read(4096)
    except OSError:  # unreadable: not one capfilt may replace
        return False
    return head.startswith(b"<!doctype html>") and b"<title>capfilt report: " in head


def check_html_target(file: Path, out: str) -> None:
    """Refuse, before any work, a page that would replace or sit among what capfilt reads: a file
    inside OUT or inside any capfilt output (a folder with a capfilt manifest.json or export.json),
    the input OUT was made from, or any existing file that is not an earlier report."""
    from capfilt.pipelines.output import input_location, output_kind, recorded_input
    page = file.resolve()  # a link to OUT/manifest.json is OUT/manifest.json
    if "://" not in out:
        root = Path(out).resolve()
        if root == page or root in page.parents:
            raise ValueError(f"--html {file} is inside the output {out}: write the report outside it")
    for folder in page.parents:
        if output_kind(str(folder)) is not None or (folder / "export.json").is_file():
            raise ValueError(f"--html {file} is inside the capfilt output {folder}: write the report outside it")
    spec = recorded_input(out)
    made_from = input_location(spec) if spec else None
    if made_from is not None and (page == made_from or made_from in page.parents):
        raise ValueError(f"--html {file} is the input {spec} that {out} was made from, or inside it: "
                         f"write the report elsewhere")
    if page.exists() and not is_report(page):
        raise ValueError(f"--html {file} exists and is not a capfilt report: name a new file (--html replaces "
                         f"only an earlier report)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="capfilt inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="a finished `capfilt curate` output, or a `capfilt download` "
                                              "output (its funnel and failure map)")
    p.add_argument("--html", metavar="FILE", help="also write the report as one self-contained HTML page")
    p.add_argument("--samples", type=int, default=24, help="kept samples in the gallery")
    p.add_argument("--per-reason", type=int, default=8, help="dropped samples per reason in the gallery")
    p.add_argument("--top-hosts", type=int, default=20, help="hosts in the download failure map, most failures first")
    add_config_args(p)
    args = p.parse_args(argv)
    for option, value in (("--samples", args.samples), ("--per-reason", args.per_reason), ("--top-hosts", args.top_hosts)):
        if value < 0:
            raise ValueError(f"{option} must be 0 or more, not {value}")
    if args.html is not None:
        check_writable(Path(args.html), "--html")
    cfg = config_from_args(args)

    from capfilt.pipelines.output import OutputLock, check_current, read_manifest
    from capfilt.pipelines import registry
    from capfilt.pipelines.report import build, print_counts, sections
    from capfilt.pipelines.report_html import render
    from capfilt.pipelines.session import spark_session
    manifest = read_manifest(args.out)  # an unfinished OUT is refused before Spark starts,
    check_current(args.out, manifest)  # and one whose stages changed after its curated rows were written
    if args.html is not None:
        check_html_target(Path(args.html), args.out)
    cfg.spark.conf.setdefault("spark.ui.showConsoleProgress", "false")  # stdout is the report
    if manifest.get("stage") != "curate" and (own := registry_sections(manifest.get("stage"))):
        # A stage's output on its own (a crawl): its counts and what the stage adds to the report.
        with OutputLock(args.out, shared=True):
            found = sections(spark_session(cfg.spark), args.out, args.top_hosts, [registry.definition(manifest["stage"])])
        print_counts(manifest["counts"], args.out)
        print_sections({"root": args.out, "sections": found}, own)
        return 0
    with OutputLock(args.out, shared=True):  # no curate rewrites OUT while it is read
        report = build(spark_session(cfg.spark), args.out, args.samples, args.per_reason, args.top_hosts)
    print_report(report)
    if args.html is not None:
        Path(args.html).write_text(render(report), encoding="utf-8")
        print(f"\nreport: {Path(args.html).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
