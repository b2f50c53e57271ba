"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""
import contextlib
import io
import socket
import threading

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


@contextlib.contextmanager
def loopback_server(serve):
    """A listener on 127.0.0.1 handing each connection to `serve(conn, stop)` in a thread of its own; yields
    (port, the connections accepted). Stopped, and every thread joined, on exit."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop, accepted, workers = threading.Event(), [], []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            accepted.append(conn)
            worker = threading.Thread(target=serve, args=(conn, stop), daemon=True)
            worker.start()
            workers.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for worker in workers:
            worker.join(5)
