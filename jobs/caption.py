"""`capfilt caption` / `spark-submit jobs/caption.py`: K synthetic captions per downloaded image.

Reads a committed download output, writes captioned records (+ rejects for images that do not
decode). Sampling is nucleus sampling, seeded per row from (seed, uid): reruns are identical.
"""
import sys

from jobs.common import run, run_model_stage, stage_parser


def main(argv=None) -> int:
    from pipelines.caption import REASONS, STAGE, caption, split_captioned
    from schemas import DOWNLOADED
    args = stage_parser("capfilt caption", __doc__).parse_args(argv)
    return run_model_stage(args, STAGE, DOWNLOADED, lambda df, cfg: caption(df, cfg.caption, cfg.seed),
                           lambda marked, cfg: split_captioned(marked), REASONS,
                           lambda cfg: {"captioner": cfg.caption.model if cfg.caption.num_captions else None})


if __name__ == "__main__":
    sys.exit(run(main))
