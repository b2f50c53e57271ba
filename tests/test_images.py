"""Decoding for the models (capfilt.udfs.images): every odd mode the web serves becomes upright 8-bit RGB;
what cannot be decoded gets a named reason, never an exception."""
import numpy as np
import pytest

from capfilt.udfs.images import decode_image, decode_images
from capfilt.world.corpus import VARIANTS, _variant_file, bomb_png
from capfilt.world.scene import render, sample_scene


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_odd_image_mode_decodes_to_upright_rgb(variant):
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    original = render(scene, 64)
    data, _ = _variant_file(variant, original, scene, rng, 90)
    image, error = decode_image(data)
    assert error is None and image.mode == "RGB" and image.size == (64, 64)
    if variant in ("exif_rotated_jpeg", "cmyk_jpeg", "animated_gif"):
        # upright and the same picture: close to the original render, not to its rotation
        diff = np.abs(np.asarray(image, float) - np.asarray(original, float)).mean()
        turned = np.abs(np.asarray(image, float) - np.asarray(original.rotate(90), float)).mean()
        assert diff < 25 and diff < turned, (variant, diff, turned)


def test_what_cannot_be_decoded_gets_a_reason():
    images, errors = decode_images([b"", b"<html>", bomb_png(40000), bomb_png(8000), None])
    assert images == [None] * 5
    assert [e.split(":")[0] for e in errors] == ["undecodable_image", "undecodable_image", "image_too_large",
                                                 "image_too_large", "undecodable_image"]
