"""Decoding image bytes for the models: RGB PIL images, or a named reason why not; and the small
copies (thumbnail_image) that dedup's pixel check, decontamination's residual and the report's
gallery are made from.

The download stage already stores 8-bit images, but a stage must not trust its input: images may
come from elsewhere, or be corrupted. Odd modes (16-bit, CMYK, palette/alpha, animated, EXIF-rotated)
are normalised exactly as at download (capfilt.net.fetch.normalise).
"""
from __future__ import annotations

import io

from PIL import Image

from capfilt.net.fetch import normalise

DEFAULT_MAX_PIXELS = 50_000_000
# The reasons a stage rejects an image it cannot use (the text before ':' in an error).
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason) with reason 'undecodable_image' or 'image_too_large'
    followed by ': detail'."""
    if not data:
        return None, f"{UNDECODABLE_IMAGE}: empty"
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            return None, f"{IMAGE_TOO_LARGE}: {image.width}x{image.height}"
        fixed = normalise(image)
        image = Image.open(io.BytesIO(fixed)) if fixed else image
        return image.convert("RGB"), None
    except Image.DecompressionBombError as e:
        return None, f"{IMAGE_TOO_LARGE}: {e}"
    except Exception as e:  # truncated, not an image, ...
        return None, f"{UNDECODABLE_IMAGE}: {type(e).__name__}"


def thumbnail_image(data: bytes | None, side: int, resample: Image.Resampling,
                    keep_ratio: bool = False) -> Image.Image | None:
    """The picture decoded as for the models (decode_image: RGB, upright, first frame) and shrunk to
    side x side with `resample`, or to fit in side x side keeping its aspect ratio (PIL's thumbnail:
    never enlarged); None when the bytes do not decode."""
    image, _error = decode_image(data)
    if image is None:
        return None
    if keep_ratio:
        image.thumbnail((side, side), resample)
        return image
    return image.resize((side, side), resample)


def decode_images(blobs, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list, list]:
    """Decode a batch: (images, errors), aligned with the input; exactly one of each pair is None."""
    images, errors = [], []
    for blob in blobs:
        image, error = decode_image(blob, max_pixels)
        images.append(image)
        errors.append(error)
    return images, errors
