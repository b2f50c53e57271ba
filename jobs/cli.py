"""The `capfilt` command: one subcommand per job. `capfilt <command> --help` for each."""
from __future__ import annotations

import argparse
import functools
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help); each stage's command comes from its declaration (stage_commands)
    "demo": ("capfilt.jobs.demo", "run the demo end to end on a generated shapes-world corpus"),
    "curate": ("capfilt.jobs.curate", "the whole chain: download, caption, filter, [decontaminate, heads, target,] dedup, [balance,] write"),
    "package": ("capfilt.jobs.package", "build the zip that spark-submit --py-files ships to executors"),
    "export": ("capfilt.jobs.export", "write training manifests (WebDataset, CSV, JSON) from a curated output"),
    "inspect": ("capfilt.jobs.report", "print the funnel, score quantiles and files of a curated output; --html report"),
    "world": ("capfilt.world.cli", "generate or serve the shapes world (the offline stand-in for the web)"),
    "lab": ("capfilt.lab.cli", "train and measure the small shapes-world models (models/)"),
    "config": ("capfilt.jobs.config", "print the effective configuration, or every key with its help"),
    "validate": ("capfilt.jobs.validate", "check a Parquet dataset or stage output against a data contract"),
}


def stage_commands() -> dict[str, tuple[str | None, str]]:
    """One command per stage of the chain, from its declaration: (its own job module, or None: the
    generic stage job, jobs/stage.py; its help)."""
    from capfilt.pipelines.registry import GROUP, stages
    clash = [s.name for s in stages() if s.name in COMMANDS]
    if clash:
        raise ValueError(f"the stage {clash[0]!r} ({GROUP}) has the name of a capfilt command: rename it")
    return {s.name: (s.command, s.help) for s in stages() if s.help}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        stage_jobs = stage_commands()
    except ValueError as e:  # a stage another package registered is broken: one line, not a traceback
        print(f"capfilt: error: {e}", file=sys.stderr)
        return 2
    commands = {**dict(list(COMMANDS.items())[:2]), **stage_jobs, **dict(list(COMMANDS.items())[2:])}
    parser = argparse.ArgumentParser(
        prog="capfilt", description="Image-text curation (BLIP-style CapFilt) on Apache Spark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14} {help}" for name, (_, help) in commands.items())
               + "\n\nRun 'capfilt COMMAND --help' for a command's options.")
    parser.add_argument("command", choices=list(commands), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    from capfilt.jobs.common import run, run_stage_job
    module = commands[ns.command][0]
    job = importlib.import_module(module).main if module else functools.partial(run_stage_job, ns.command)
    return run(job, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
