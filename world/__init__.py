"""The shapes world: a synthetic image-text domain with known ground truth.

It stands in for the web (a noisy LAION-style corpus served over loopback HTTP, with faults) and
for COCO (a clean annotated split), so the pipeline can be built and measured offline.
"""

from capfilt.world.captions import N_PHRASINGS, VOCABULARY, describe, parse, web_phrasing
from capfilt.world.corpus import FAULTS, KINDS, VARIANTS, make_annotated, make_web_corpus, write_metadata
from capfilt.world.evalset import EvalImage, make_eval_set, modified_copy, read_eval_set
from capfilt.world.scene import (
    Scene, SceneObject, Watermark, attribute_differences, change_one_attribute, draw_watermark, encode_jpeg, render,
    sample_scene, sample_watermark,
)
from capfilt.world.server import WorldServer, serve

__all__ = [
    "FAULTS", "KINDS", "N_PHRASINGS", "VARIANTS", "VOCABULARY", "EvalImage", "Scene", "SceneObject", "Watermark",
    "WorldServer", "attribute_differences", "change_one_attribute", "describe", "draw_watermark", "encode_jpeg",
    "make_annotated", "make_eval_set", "make_web_corpus", "modified_copy", "parse", "read_eval_set", "render",
    "sample_scene", "sample_watermark", "serve", "web_phrasing", "write_metadata",
]
