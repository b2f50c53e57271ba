"""`capfilt filter` / `spark-submit jobs/filter.py`: CLIP-score web and synthetic captions, keep the aligned.

Reads a committed caption output, writes scored records (every candidate with its score and whether
the rule kept it, the best caption, the image embedding) + rejects (`no_aligned_caption`, ...).
"""
import sys

from jobs.common import run, run_model_stage, stage_parser


def main(argv=None) -> int:
    from pipelines.filter import REASONS, STAGE, percentile_cutoff, score, select, split_scored
    from schemas import CAPTIONED
    args = stage_parser("capfilt filter", __doc__).parse_args(argv)
    cutoffs = {}

    def split(marked, cfg):
        cutoff = percentile_cutoff(marked, cfg.filter.percentile) if cfg.filter.rule == "percentile" else None
        cutoffs["percentile_cutoff"] = cutoff
        return split_scored(select(marked, cfg.filter, cutoff))

    return run_model_stage(args, STAGE, CAPTIONED, lambda df, cfg: score(df, cfg.filter), split, REASONS,
                           lambda cfg: {"clip": cfg.filter.model, "rule": cfg.filter.rule, **cutoffs})


if __name__ == "__main__":
    sys.exit(run(main))
