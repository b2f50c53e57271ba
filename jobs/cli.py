"""The `capfilt` command: one subcommand per job. `capfilt <command> --help` for each."""
from __future__ import annotations

import argparse
import sys

COMMANDS = {
    # name: (module, one-line help)
    "demo": ("capfilt.jobs.demo", "run the demo end to end on a generated shapes-world corpus"),
    "curate": ("capfilt.jobs.curate", "the whole chain: download, caption, filter, [decontaminate, heads,] dedup, write"),
    "download": ("capfilt.jobs.download", "fetch the images of a LAION-style dump with img2dataset on Spark"),
    "caption": ("capfilt.jobs.caption", "write K synthetic captions per image (nucleus sampling)"),
    "filter": ("capfilt.jobs.filter", "CLIP-score web and synthetic captions and keep the aligned ones"),
    "decontaminate": ("capfilt.jobs.decontaminate", "drop copies of evaluation images (decontaminate.sets)"),
    "heads": ("capfilt.jobs.heads", "score rows with small heads over the stored CLIP embedding; drop or flag"),
    "dedup": ("capfilt.jobs.dedup", "drop exact and near-duplicate pairs; write the curated Parquet"),
    "package": ("capfilt.jobs.package", "build the zip that spark-submit --py-files ships to executors"),
    "export": ("capfilt.jobs.export", "write training manifests (WebDataset, CSV, JSON) from a curated output"),
    "inspect": ("capfilt.jobs.report", "print the funnel, score quantiles and files of a curated output; --html report"),
    "world": ("capfilt.world.cli", "generate or serve the shapes world (the offline stand-in for the web)"),
    "lab": ("capfilt.lab.cli", "train and measure the small shapes-world models (models/)"),
    "config": ("capfilt.jobs.config", "print the effective configuration, or every key with its help"),
    "validate": ("capfilt.jobs.validate", "check a Parquet dataset or stage output against a data contract"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="capfilt", description="Image-text curation (BLIP-style CapFilt) on Apache Spark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14} {help}" for name, (_, help) in COMMANDS.items())
               + "\n\nRun 'capfilt COMMAND --help' for a command's options.")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    import importlib
    module = importlib.import_module(COMMANDS[ns.command][0])
    from capfilt.jobs.common import run
    return run(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
