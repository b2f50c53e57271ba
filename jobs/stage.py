"""`capfilt <stage>` / `spark-submit jobs/stage.py <stage>`: one stage of the chain alone.

    capfilt filter --input OUT/stages/caption --output filtered
    spark-submit --master spark://host:7077 --py-files capfilt.zip jobs/stage.py filter --input ... --output ...

Reads a committed stage output (--input), runs the stage by the runner (resumable, atomic commit) into
--output. Every stage of the chain has this command, a stage added by another package included
(pipelines/registry.py); `capfilt <stage> --help` gives its options, `capfilt config --keys` its settings.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        from capfilt.pipelines.registry import names
        print(f"usage: jobs/stage.py STAGE --input DIR --output DIR [options] (STAGE: {', '.join(names()[1:])})",
              file=sys.stderr)
        return 2
    return run_stage_job(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(run(main))
