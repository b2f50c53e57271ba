"""What runs inside the download workers around img2dataset's own Downloader and Resizer.

img2dataset fetches with `urllib.request.urlopen`, i.e. through the process-wide opener. Each worker
installs ours before a shard starts: every connection (redirect hops included) goes through the
address policy of udfs.netguard, proxies from the environment are ignored, opt-out headers are
honoured for capfilt's token and img2dataset's, and bodies are capped in size. SafeResizer reads the
image header before img2dataset decodes anything, so a decompression bomb never reaches memory, and
normalises what OpenCV mishandles (EXIF rotation, 16-bit, CMYK, palette/alpha, animation) with PIL.
"""
from __future__ import annotations

import http.client
import io
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from udfs import netguard

OPTED_OUT_MARK = "opted_out"
TOO_LARGE_MARK = "response_too_large"


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...] = ()
    loopback_only: bool = False
    max_bytes: int = 32 * 1024 * 1024
    user_agent_tokens: tuple[str, ...] = ("capfilt", "img2dataset")
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")


class _Limits(urllib.request.BaseHandler):
    """Opt-out headers and a body size cap, on every response."""

    handler_order = 400  # before HTTPErrorProcessor, so redirect hops are checked too

    def __init__(self, policy: FetchPolicy):
        self.policy = policy

    def http_response(self, request, response):
        from img2dataset.downloader import is_disallowed
        directives = set(self.policy.opt_out_directives)
        if directives:
            for token in self.policy.user_agent_tokens:
                if is_disallowed(response.headers, token, directives):
                    response.close()
                    raise urllib.error.URLError(
                        f"{OPTED_OUT_MARK}: X-Robots-Tag {response.headers.get_all('X-Robots-Tag')} "
                        f"(Use of image disallowed by X-Robots-Tag directive)")
        limit = self.policy.max_bytes
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            response.close()
            raise urllib.error.URLError(f"{TOO_LARGE_MARK}: Content-Length {length} > {limit} bytes")
        read = response.read

        def capped_read(amt=None):
            data = read(limit + 1 if amt is None or amt < 0 else amt)
            if amt is None and len(data) > limit:
                raise urllib.error.URLError(f"{TOO_LARGE_MARK}: body over {limit} bytes")
            return data

        response.read = capped_read
        return response

    https_response = http_response


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    addresses = netguard.AddressPolicy(list(policy.allow_hosts))

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = addresses.create_connection

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = addresses.create_connection

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req, context=self._context)

    # ProxyHandler({}): a proxy from the environment would make the proxy the peer we check.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), GuardedHTTPHandler,
                                       GuardedHTTPSHandler, _Limits(policy))


_installed: FetchPolicy | None = None


def prepare_worker(policy: FetchPolicy) -> None:
    """Install the guarded opener in this (reused) worker process; cheap when already done."""
    global _installed
    if _installed == policy:
        return
    if policy.loopback_only:
        netguard.refuse_non_loopback()
    else:
        netguard.allow_any_connect()
    urllib.request.install_opener(build_opener(policy))
    _installed = policy


class GuardedDownloader:
    """img2dataset's Downloader, run after prepare_worker. Picklable: shipped to executors as is."""

    def __init__(self, downloader, policy: FetchPolicy):
        self.downloader = downloader
        self.policy = policy

    def __call__(self, row):
        prepare_worker(self.policy)
        return self.downloader(row)


_NEEDS_PIL_MODES = {"I;16", "I;16B", "I;16L", "I", "F", "CMYK", "P", "PA", "LA", "RGBA", "1", "YCbCr", "LAB", "HSV"}


class SafeResizer:
    """Header check before decode, PIL normalisation of odd images, then img2dataset's Resizer."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.getvalue() if hasattr(img_stream, "getvalue") else img_stream.read()
        if not data:
            return None, None, None, None, None, "Image decoding error: empty body"
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            return None, None, None, None, None, f"image area too large: {e}"
        except Image.UnidentifiedImageError:
            return None, None, None, None, None, "Image decoding error: not an image format we know"
        except Exception as e:
            return None, None, None, None, None, f"Image decoding error: {type(e).__name__}: {e}"
        width, height = image.size
        if width * height > self.max_pixels:
            return None, None, None, None, None, f"image area too large: header says {width}x{height}"
        try:
            data = normalise(image) or data
        except Exception as e:
            return None, None, None, None, None, f"Image decoding error: {type(e).__name__}: {e}"
        return self.resizer(io.BytesIO(data), blurring_bbox_list)


def normalise(image: Image.Image) -> bytes | None:
    """PNG bytes of an 8-bit RGB, upright, first-frame version of `image`; None when OpenCV can take
    the original as it is (the common case: no re-encode)."""
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    animated = getattr(image, "is_animated", False) or image.format == "GIF"
    if orientation in (None, 1) and not animated and image.mode not in _NEEDS_PIL_MODES:
        return None
    image.seek(0)
    image.load()  # decodes now; also raises on truncated data
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((arr >> 8 if arr.max() > 255 else arr).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
