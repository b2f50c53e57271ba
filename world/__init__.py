"""The shapes world: a synthetic image-text domain with known ground truth.

It stands in for the web (a noisy LAION-style corpus served over loopback HTTP, with faults) and
for COCO (a clean annotated split), so the pipeline can be built and measured offline.
"""

from capfilt.world.captions import N_PHRASINGS, VOCABULARY, describe, parse, web_phrasing
from capfilt.world.corpus import FAULTS, KINDS, VARIANTS, make_annotated, make_web_corpus, write_metadata
from capfilt.world.scene import (
    Scene, SceneObject, attribute_differences, change_one_attribute, encode_jpeg, render, sample_scene,
)
from capfilt.world.server import WorldServer, serve

__all__ = [
    "FAULTS", "KINDS", "N_PHRASINGS", "VARIANTS", "VOCABULARY", "Scene", "SceneObject", "WorldServer",
    "attribute_differences", "change_one_attribute", "describe", "encode_jpeg", "make_annotated",
    "make_web_corpus", "parse", "render", "sample_scene", "serve", "web_phrasing", "write_metadata",
]
