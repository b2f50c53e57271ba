"""`capfilt dedup` / `spark-submit jobs/dedup.py`: drop exact and near-duplicate pairs.

Reads a committed filter output, writes the survivors (one per duplicate group, which may inherit the
group's kept captions) + rejects with the reason and `duplicate_of`. Evidence: identical image
bytes, near-duplicate images (faiss on the filter's embeddings, confirmed on thumbnails),
near-duplicate web captions (MinHash-LSH, identical to datasketch) together with similar images
confirmed on thumbnails, as image pairs are.
docs/dedup.md has the policy.
"""
import sys

from capfilt.jobs.common import run, run_stage_job


def main(argv=None) -> int:
    return run_stage_job("dedup", __doc__, argv)


if __name__ == "__main__":
    sys.exit(run(main))
