"""Training and evaluation of the small models of the shapes world (the CLIP filter and the
BLIP captioner that tests, benchmarks and the demo load through `capfilt.udfs.models`).

    python -m capfilt.lab train clip --out models/shapes-clip --seed 0 --minutes 12
    python -m capfilt.lab train captioner --out models/shapes-captioner --seed 0 --minutes 16
    python -m capfilt.lab eval --clip models/shapes-clip --captioner models/shapes-captioner

Data comes from `world` in memory; no Spark. See docs/models.md.
"""
