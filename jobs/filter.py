"""`capfilt filter` / `spark-submit jobs/filter.py`: CLIP-score web and synthetic captions, keep the aligned.

Reads a committed caption output, writes for each kept row its candidates (every caption with its
score and whether the rule kept it), the best caption and the image embedding, + rejects
(`no_aligned_caption`, ...). Every row's scores stay in the output (model/): a rerun that changes
only filter.rule, threshold, top_k or percentile re-selects from them without loading CLIP.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    return run_stage_job("filter", __doc__, argv)


if __name__ == "__main__":
    sys.exit(run(main))
