"""Decoding image bytes for the models: RGB PIL images, or a named reason why not.

The download stage already stores 8-bit images, but a stage must not trust its input: images may
come from elsewhere, or be corrupted. Odd modes (16-bit, CMYK, palette/alpha, animated, EXIF-rotated)
are normalised exactly as at download (capfilt.udfs.fetch.normalise).
"""
from __future__ import annotations

import io

from PIL import Image

from capfilt.udfs.fetch import normalise

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


def decode_images(blobs, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list, list]:
    """Decode a batch: (images, errors), aligned with the input; exactly one of each pair is None."""
    images, errors = [], []
    for blob in blobs:
        image, error = decode_image(blob, max_pixels)
        images.append(image)
        errors.append(error)
    return images, errors
