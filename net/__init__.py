"""Talking to the web from a download worker (no Spark): the guarded fetcher around img2dataset's
Downloader and Resizer (fetch.py, with the reduced-size JPEG decode of its resize, reduced_decode.py),
the address policy (netguard.py), robots.txt (robots.py) and per-host politeness (polite.py).

It imports only the standard library, third-party packages and capfilt.schemas: never pipelines,
jobs or udfs (tests/test_layers.py holds it).
"""
