"""JPEG decoding at reduced size for the download stage's resize.

Web images arrive at 500-2,000 px and are stored at `image_size` (256 by default). libjpeg can
decode a JPEG directly at 1/2, 1/4 or 1/8 scale in the DCT domain (OpenCV's IMREAD_REDUCED_*),
skipping most of the inverse DCT and colour conversion of a full decode; img2dataset always decodes
at full size. The scale is chosen per image from its header: the largest one that still leaves the
side the resize keys on (the short side for keep_ratio and center_crop, the long side for border and
keep_ratio_largest) at least MARGIN x `image_size`, then img2dataset's resize runs as usual on the
smaller picture. Only plain JPEGs (8-bit greyscale or RGB, upright) take this path; every other image goes
through img2dataset's Resizer unchanged. A plain JPEG too small to reduce takes it at scale 1: the same
decode, transforms and encoder as the Resizer, byte for byte, without its per-image set-up.
"""
from __future__ import annotations

import threading

import cv2
import numpy as np

_SCALES = {1: (cv2.IMREAD_COLOR, cv2.IMREAD_GRAYSCALE),
           2: (cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
           4: (cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
           8: (cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_REDUCED_GRAYSCALE_8)}
# The reduced picture keeps at least this many times the stored side, so that the usual resize still
# averages over it. On 187 shapes-world JPEGs of 512-2,048 px the stored image's PSNR against a full
# decode's had a minimum of 33.5 dB with 1.0 (a 1,281 px image decoded at 1/4 to 320 px, then
# resized to 256) and 38.9 dB with 1.5, at the same speed.
MARGIN = 1.5
_SHORT_SIDE_MODES = ("keep_ratio", "center_crop")
_LONG_SIDE_MODES = ("border", "keep_ratio_largest")


def reduction(width: int, height: int, image_size: int, resize_mode: str) -> int:
    """The libjpeg scale denominator (1, 2, 4 or 8) for an image of this size: the largest that keeps
    the side the resize keys on at least MARGIN x image_size (1: decode at full size)."""
    if resize_mode in _SHORT_SIDE_MODES:
        side = min(width, height)
    elif resize_mode in _LONG_SIDE_MODES:
        side = max(width, height)
    else:  # "no": the stored image is the original
        return 1
    return next((r for r in (8, 4, 2) if side // r >= MARGIN * image_size), 1)


def reduced_resize(resizer, data: bytes, width: int, height: int, grey: bool, scale: int):
    """img2dataset's Resizer result (img_str, width, height, original_width, original_height, err)
    for a JPEG decoded at 1/scale (one channel when grey, as a full IMREAD_UNCHANGED decode keeps it):
    the same checks on the original's size (from the header), then the same albumentations
    transforms and encoder the Resizer uses."""
    try:
        return _reduced_resize(resizer, data, width, height, grey, scale)
    except Exception as err:  # as img2dataset's Resizer does: the row gets a reason, the shard goes on
        return None, None, None, None, None, f"Image decoding error: {type(err).__name__}: {err}"


def _reduced_resize(resizer, data: bytes, width: int, height: int, grey: bool, scale: int):
    if min(width, height) < resizer.min_image_size:
        return None, None, None, None, None, "image too small"
    if width * height > resizer.max_image_area:
        return None, None, None, None, None, "image area too large"
    if max(width, height) / min(width, height) > resizer.max_aspect_ratio:
        return None, None, None, None, None, "aspect ratio too large"
    cv2.setNumThreads(1)
    color, grey_flag = _SCALES[scale]
    buffer = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buffer, (grey_flag if grey else color) | cv2.IMREAD_IGNORE_ORIENTATION)  # as UNCHANGED
    if img is None:
        return None, None, None, None, None, "Image decoding error"
    mode = resizer.resize_mode.name if hasattr(resizer.resize_mode, "name") else str(resizer.resize_mode)
    side = min(width, height) if mode in _SHORT_SIDE_MODES else max(width, height) if mode in _LONG_SIDE_MODES else None
    if side is not None:  # img2dataset's Resizer's choices, on the original's size
        downscale = side > resizer.image_size
        if downscale or not resizer.resize_only_if_bigger:
            interpolation = resizer.downscale_interpolation if downscale else resizer.upscale_interpolation
            for transform in _transforms(mode, resizer.image_size, interpolation):
                img = transform(image=img)["image"]
    ok, encoded = cv2.imencode(f".{resizer.encode_format}", img, params=resizer.encode_params)
    if not ok:
        return None, None, None, None, None, "Image encoding error"
    return encoded.tobytes(), img.shape[1], img.shape[0], width, height, None


_built = threading.local()


def _transforms(mode: str, size: int, interpolation: int) -> list:
    """The albumentations transforms img2dataset's Resizer builds on every call, built once per
    download thread (building them, with pydantic validation, was a quarter of a reduced resize;
    each thread keeps its own, as a transform is not meant to be shared between threads)."""
    import albumentations as A
    cache = _built.__dict__.setdefault("transforms", {})
    key = (mode, size, interpolation)
    if key not in cache:
        if mode in _SHORT_SIDE_MODES:
            cache[key] = [A.SmallestMaxSize(max_size=size, interpolation=interpolation, p=1.0)]
            if mode == "center_crop":
                cache[key].append(A.CenterCrop(height=size, width=size))
        else:
            cache[key] = [A.LongestMaxSize(max_size=size, interpolation=interpolation, p=1.0)]
            if mode == "border":
                cache[key].append(A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT,
                                                value=[255, 255, 255], p=1.0))
    return cache[key]
