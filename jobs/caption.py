"""`capfilt caption` / `spark-submit jobs/caption.py`: K synthetic captions per downloaded image.

Reads a committed download output, writes the synthetic captions of each image (uid, part,
synthetic_captions: the images stay in the download) + rejects for images that do not decode.
Sampling is nucleus sampling, seeded per row from (seed, uid): reruns are identical.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    return run_stage_job("caption", __doc__, argv)


if __name__ == "__main__":
    sys.exit(run(main))
