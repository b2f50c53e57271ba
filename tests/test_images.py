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


def _three_thumbnails(data):
    from capfilt.pipelines.report import thumbnail as gallery
    from capfilt.udfs.decontaminate import thumbnail as residual
    from capfilt.udfs.image_dedup import thumbnail as pixels
    return pixels(data), residual(data), gallery(data)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_thumbnail_is_made_from_the_models_decoding(variant):
    """Dedup's pixel check (32 px, box filter), decontamination's residual (64 px, bilinear, blurred)
    and the report's gallery (a JPEG of at most 96 px a side, aspect kept) all shrink what
    decode_image gives: an EXIF-rotated or CMYK copy is compared upright and in RGB."""
    import base64
    import io

    import cv2
    from PIL import Image

    from capfilt.udfs.images import thumbnail_image
    rng = np.random.default_rng(5)
    scene = sample_scene(rng)
    data, _ = _variant_file(variant, render(scene, 128), scene, rng, 90)
    decoded, _ = decode_image(data)
    pixels, residual, gallery = _three_thumbnails(data)
    assert np.array_equal(pixels, np.asarray(decoded.resize((32, 32), Image.Resampling.BOX)))
    assert np.array_equal(residual, cv2.GaussianBlur(
        np.asarray(decoded.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32), (0, 0), 2.0))
    shown = Image.open(io.BytesIO(base64.b64decode(gallery.split(",", 1)[1])))
    assert shown.size == (96, 96)
    assert np.abs(np.asarray(shown, float) - np.asarray(thumbnail_image(data, 96, Image.Resampling.BICUBIC), float)).mean() < 3


def test_a_thumbnail_keeps_the_aspect_ratio_only_when_asked_and_never_enlarges():
    from PIL import Image

    from capfilt.udfs.images import thumbnail_image
    from helpers import encoded
    wide, small = encoded(Image.new("RGB", (300, 180), "red")), encoded(Image.new("RGB", (50, 70), "blue"))
    assert thumbnail_image(wide, 96, Image.Resampling.BICUBIC, keep_ratio=True).size == (96, 58)
    assert thumbnail_image(small, 96, Image.Resampling.BICUBIC, keep_ratio=True).size == (50, 70)
    assert thumbnail_image(wide, 32, Image.Resampling.BOX).size == (32, 32)
    assert thumbnail_image(small, 64, Image.Resampling.BILINEAR).size == (64, 64)


def test_what_cannot_be_decoded_has_no_thumbnail_and_raises_nothing():
    for data in (b"", b"<html>", None, bomb_png(40000)):
        assert _three_thumbnails(data) == (None, None, None)
