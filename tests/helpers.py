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


def shapes_args(tmp_path) -> list:
    """curate's arguments with the project's shapes models (no hub) on a one-row input."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    from capfilt.udfs.models import SHAPES_CLIP
    metadata = tmp_path / "in.csv"
    metadata.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a red circle\n")
    return ["--input", metadata, *_as_overrides(shapes_world_settings(load_config(None))),
            "--set", f"filter.model={SHAPES_CLIP}"]
