"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""
import io

from PIL import Image


def encoded(image: Image.Image, fmt: str = "JPEG", **save_args) -> bytes:
    """The bytes of `image` saved as `fmt` (PIL's save arguments: quality=..., ...)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def solid(colour, size: int = 64, fmt: str = "JPEG") -> bytes:
    """A size x size RGB image of one colour, encoded."""
    return encoded(Image.new("RGB", (size, size), colour), fmt)
