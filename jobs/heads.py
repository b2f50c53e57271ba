"""`capfilt heads` / `spark-submit jobs/heads.py`: score rows with small heads over the stored embedding.

Reads a committed filter output (or any later one), writes each row's head scores (`head_scores`) and
drops the rows a `heads.drop` head flags (reason: the head's name, score in the detail). No image is
decoded and no CLIP runs. docs/models.md describes heads and their cards.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    return run_stage_job("heads", __doc__, argv)


if __name__ == "__main__":
    sys.exit(run(main))
