"""`capfilt decontaminate` / `spark-submit jobs/decontaminate.py`: drop copies of evaluation images.

Reads a committed filter output (or any later one), writes the rows that are no copy of an image in
`decontaminate.sets` + rejects (`eval_contaminated`, with the evaluation item in the detail). Exact copies
by sha256, near copies by the cosine of the stored image embedding (faiss), confirmed
on the pixels. docs/filters.md has the policy.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    return run_stage_job("decontaminate", __doc__, argv)


if __name__ == "__main__":
    sys.exit(run(main))
