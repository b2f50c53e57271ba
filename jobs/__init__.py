"""Thin entry points: `capfilt <command>` and `spark-submit jobs/<stage>.py`. Nothing imports a job."""
