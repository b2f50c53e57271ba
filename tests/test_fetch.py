"""The worker-side pieces of the download stage, without Spark: address policy, loopback-only mode,
the guarded opener (schemes, short bodies, the request deadline) and the header check + normalisation
in front of img2dataset's resizer."""
import contextlib
import io
import socket
import time

import numpy as np
import pytest
from img2dataset.downloader import download_image
from PIL import Image

from capfilt.net import netguard
from capfilt.net.fetch import SafeResizer, normalise
from capfilt.net.polite import RETRYABLE_CODES
from capfilt.world.corpus import bomb_png
from helpers import encoded, loopback_server


@pytest.mark.parametrize("ip, reason", [
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("100.64.0.1", "special-purpose"), ("8.8.8.8", None), ("2606:4700::1", None),
])
def test_why_blocked_names_the_kind_of_address(ip, reason):
    assert netguard.why_blocked(ip) == reason


def test_policy_checks_the_resolved_address_not_the_name(monkeypatch, loopback_only):
    real = socket.getaddrinfo

    def fake_dns(host, port, *args, **kwargs):  # a public-looking name that resolves inside
        if host == "images.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    policy = netguard.AddressPolicy()
    with pytest.raises(netguard.BlockedAddress, match=r"images.example.com -> 10.9.8.7 \(private\)"):
        policy.create_connection(("images.example.com", 80), timeout=1)
    assert loopback_only == [], "blocked before any connect was attempted"


def test_allow_list_lets_one_endpoint_through(loopback_only):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        policy = netguard.AddressPolicy([f"127.0.0.1:{port}"])
        policy.create_connection(("127.0.0.1", port), timeout=2).close()
        policy.create_connection(("localhost", port), timeout=2).close()  # same endpoint, other spelling
        with pytest.raises(netguard.BlockedAddress):
            policy.create_connection(("127.0.0.1", port + 1 if port < 65535 else port - 1), timeout=2)
    finally:
        server.close()


def test_loopback_only_mode_refuses_everything_else(loopback_only):
    with pytest.raises(ConnectionRefusedError, match="loopback-only"):
        socket.create_connection(("10.255.255.1", 80), timeout=1)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)  # no DNS packet either
    assert ("10.255.255.1", 80) in loopback_only


class _Echo:
    """Stands in for img2dataset's Resizer: records what it was given."""

    def __call__(self, stream, bbox=None):
        self.data = stream.read()
        im = Image.open(io.BytesIO(self.data))
        return self.data, im.width, im.height, im.width, im.height, None


def test_bomb_header_is_refused_before_decoding():
    inner = _Echo()
    for side in (40000, 9000):  # over PIL's own limit; and over ours only (81M > 50M)
        result = SafeResizer(inner, max_pixels=50_000_000)(io.BytesIO(bomb_png(side)))
        assert result[-1].startswith("image area too large"), result[-1]
    assert not hasattr(inner, "data"), "nothing reached the decoder"


def test_exif_rotation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(im, "JPEG", exif=exif.tobytes())
    inner = _Echo()
    _, w, h, *_ , err = SafeResizer(inner, 10**8)(io.BytesIO(data))
    assert err is None and (w, h) == (20, 40)


def test_sixteen_bit_and_alpha_and_animation_become_8bit_rgb():
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(encoded(sixteen, "PNG"))))))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(encoded(transparent, "PNG"))))))
    assert out.getpixel((0, 0)) == (255, 255, 255), "alpha composited over white"
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(gif)))))
    assert out.mode == "RGB" and out.getpixel((0, 0))[2] > 200, "first frame"
    plain = Image.open(io.BytesIO(encoded(Image.new("RGB", (8, 8)), "JPEG")))
    assert normalise(plain) is None, "ordinary images pass through untouched"


def test_undecodable_bodies_get_a_stable_reason():
    resizer = SafeResizer(_Echo(), 10**8)
    for body in (b"", b"<html>not an image</html>", encoded(Image.new("RGB", (64, 64)), "JPEG")[:200]):
        *_, err = resizer(io.BytesIO(body))
        assert err.startswith("Image decoding error"), err
        assert "0x" not in err, "no memory addresses: details must be deterministic"


# --- reduced-size JPEG decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("width, height, mode, scale", [
    (2048, 1536, "border", 4), (2048, 1536, "keep_ratio", 4), (3072, 3072, "center_crop", 8),
    (800, 600, "border", 2), (700, 700, "border", 1), (4000, 500, "keep_ratio", 1), (4000, 4000, "no", 1),
])
def test_the_decode_scale_keeps_half_again_the_side_the_resize_keys_on(width, height, mode, scale):
    from capfilt.net.reduced_decode import reduction
    assert reduction(width, height, 256, mode) == scale


def _img2dataset_resizer(mode="border", size=256):
    from img2dataset.resizer import Resizer
    return Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False, encode_quality=95,
                   encode_format="jpg", min_image_size=32, max_image_area=50_000_000, max_aspect_ratio=10)


def _psnr(a: bytes, b: bytes) -> float:
    x, y = (np.asarray(Image.open(io.BytesIO(d)), dtype=float) for d in (a, b))
    return 10 * np.log10(255 ** 2 / max(((x - y) ** 2).mean(), 1e-12))


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "center_crop", "keep_ratio_largest"])
def test_a_large_jpeg_is_decoded_at_reduced_size_and_stores_what_a_full_decode_stores(monkeypatch, mode):
    import cv2

    from capfilt.world.scene import encode_jpeg, render, sample_scene
    rng = np.random.default_rng(3)
    flags = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flag: flags.append(flag) or real(buf, flag))
    for side, quality, grey in ((1300, 60, False), (1700, 85, False), (1200, 95, True)):
        image = render(sample_scene(rng), side, rng).crop((0, 0, side, side * 3 // 4))  # not square
        data = encode_jpeg(image.convert("L") if grey else image, quality)
        full = SafeResizer(_img2dataset_resizer(mode), 10**8)(io.BytesIO(data))
        flags.clear()
        reduced = SafeResizer(_img2dataset_resizer(mode), 10**8, reduced_decode=True)(io.BytesIO(data))
        reduced_flags = cv2.IMREAD_REDUCED_GRAYSCALE_2 | cv2.IMREAD_REDUCED_GRAYSCALE_4 | cv2.IMREAD_REDUCED_GRAYSCALE_8
        assert flags and all(f > 0 and f & reduced_flags for f in flags), "decoded at reduced size only"
        assert reduced[1:] == full[1:], "same size, same original size, no error"
        assert Image.open(io.BytesIO(reduced[0])).mode == ("L" if grey else "RGB")
        assert _psnr(reduced[0], full[0]) >= 35


def test_reduced_resizes_in_many_threads_store_what_one_thread_stores():
    from concurrent.futures import ThreadPoolExecutor

    from capfilt.world.scene import encode_jpeg, render, sample_scene
    rng = np.random.default_rng(5)
    bodies = [encode_jpeg(render(sample_scene(rng), side, rng), 80) for side in (800, 1000, 1200, 1600) * 4]
    resizer = SafeResizer(_img2dataset_resizer(), 10**8, reduced_decode=True)  # one, as img2dataset's threads share it
    alone = [resizer(io.BytesIO(b)) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda b: resizer(io.BytesIO(b)), bodies * 3)) == alone * 3


def test_every_other_image_takes_img2dataset_s_full_decode_as_before():
    from capfilt.world.corpus import _variant_file
    from capfilt.world.scene import encode_jpeg, render, sample_scene
    rng = np.random.default_rng(4)
    scene = sample_scene(rng)
    large = render(scene, 1024, rng)
    bodies = [encode_jpeg(render(scene, 300, rng), 90), encoded(large, "PNG"), encoded(large, "WEBP")]
    bodies += [_variant_file(v, large, scene, rng, 80)[0] for v in ("cmyk_jpeg", "exif_rotated_jpeg", "rgba_png")]
    for data in bodies:
        assert SafeResizer(_img2dataset_resizer(), 10**8, reduced_decode=True)(io.BytesIO(data)) == \
            SafeResizer(_img2dataset_resizer(), 10**8)(io.BytesIO(data))
    too_large = SafeResizer(_img2dataset_resizer(), 1000 * 1000, reduced_decode=True)(io.BytesIO(bodies[1]))
    assert too_large[-1].startswith("image area too large"), "the header check still runs first"
    # a large JPEG whose body breaks after the header: a named error for the row, not an exception
    truncated = encode_jpeg(large, 90)[:2000]
    *_, err = SafeResizer(_img2dataset_resizer(), 10**8, reduced_decode=True)(io.BytesIO(truncated))
    assert err.startswith("Image decoding error"), err



@pytest.mark.parametrize("mode", ["border", "keep_ratio", "center_crop", "keep_ratio_largest", "no"])
@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_a_plain_jpeg_stores_what_img2dataset_stores_byte_for_byte(monkeypatch, mode, only_if_bigger):
    """A JPEG decoded at full size skips the Resizer call (its per-image set-up) and must not notice."""
    from img2dataset.resizer import Resizer

    from capfilt.world.scene import encode_jpeg, render, sample_scene
    rng = np.random.default_rng(5)
    calls = []
    monkeypatch.setattr(Resizer, "__call__", lambda self, *a, real=Resizer.__call__: calls.append(1) or real(self, *a))
    for side, crop, grey, size in ((48, 36, False, 64), (64, 64, True, 64), (300, 200, False, 64),
                                   (500, 700, True, 256), (200, 150, False, 256)):
        resizer = Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger, encode_quality=90,
                          encode_format="jpg", min_image_size=16, max_image_area=50_000_000, max_aspect_ratio=10)
        image = render(sample_scene(rng), max(side, crop), rng).crop((0, 0, side, crop))
        data = encode_jpeg(image.convert("L") if grey else image, 85)
        calls.clear()
        ours = SafeResizer(resizer, 10**8)(io.BytesIO(data))
        assert not calls, "the Resizer was not called"
        assert ours == resizer(io.BytesIO(data)), (side, crop, grey, size)

# --- the guarded opener, driven the way img2dataset's workers drive it ------------------------------

@contextlib.contextmanager
def _server(respond):
    """A loopback HTTP server: `respond(path, conn, stop)` writes the raw answer to each request.
    Stopped (and its connection threads joined) on exit."""
    def serve(conn, stop):
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                respond(request.split(b" ", 2)[1].decode(), conn, stop)
            except OSError:
                pass  # the client went away

    with loopback_server(serve) as (port, _):
        yield port


@contextlib.contextmanager
def _canary():
    """A listener nobody should reach: yields its port and a function counting connections made to it
    (the kernel queues them without accept)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    def connections():
        count = 0
        while True:
            try:
                listener.accept()[0].close()
                count += 1
            except BlockingIOError:
                return count

    try:
        yield listener.getsockname()[1], connections
    finally:
        listener.close()


def _fetch(url, timeout=2):
    """img2dataset's own download_image (urlopen through the installed opener, then r.read())."""
    _, stream, err = download_image((0, url), timeout, "capfilt", None)
    return stream.getvalue() if stream else None, err


def _answer(status, headers=(), body=b""):
    def respond(path, conn, stop):
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
    return respond


@pytest.mark.parametrize("target", [
    "ftp://127.0.0.1:{canary}/x.png", "FTP://127.0.0.1:{canary}/x.png", "fTp://127.0.0.1:{canary}/x.png",
    "file://127.0.0.1:{canary}/etc/hostname", "file:///etc/hostname", "data:image/png;base64,iVBORw0KGgo=",
    "gopher://127.0.0.1:{canary}/x", "unknown-scheme://127.0.0.1:{canary}/x",
])
@pytest.mark.parametrize("how", ["redirect", "direct"])
def test_only_http_and_https_are_fetched_on_any_hop(guarded_worker, target, how):
    with _canary() as (canary, connections):
        target = target.format(canary=canary)
        with _server(_answer("302 Found", [("Location", target), ("Content-Length", 0)])) as port:
            # The canary is allow-listed too: what is refused is the scheme, not the address.
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}", f"127.0.0.1:{canary}"))
            body, err = _fetch(f"http://127.0.0.1:{port}/a.png" if how == "redirect" else target)
        assert body is None and netguard.BLOCKED_MARK in err, err
        assert connections() == 0, "no connection to the canary"


def test_http_redirects_are_still_followed(guarded_worker):
    with _server(_answer("200 OK", [("Content-Length", 5)], b"image")) as end:
        hop = _answer("301 Moved", [("Location", f"http://127.0.0.1:{end}/end.png"), ("Content-Length", 0)])
        with _server(hop) as start:
            guarded_worker(allow_hosts=(f"127.0.0.1:{start}", f"127.0.0.1:{end}"))
            assert _fetch(f"http://127.0.0.1:{start}/a.png") == (b"image", None)


def test_redirect_to_a_port_not_allowed_is_still_blocked(guarded_worker):
    with _canary() as (canary, connections):
        hop = _answer("302 Found", [("Location", f"http://127.0.0.1:{canary}/x.png"), ("Content-Length", 0)])
        with _server(hop) as port:
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
            body, err = _fetch(f"http://127.0.0.1:{port}/a.png")
        assert body is None and netguard.BLOCKED_MARK in err, err
        assert connections() == 0


def test_body_shorter_than_content_length_is_a_retryable_download_failure(guarded_worker):
    with _server(_answer("200 OK", [("Content-Length", 100_000)], b"\x89PNG" + b"x" * 46)) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
        body, err = _fetch(f"http://127.0.0.1:{port}/short.png")
        assert body is None and "IncompleteRead(50 bytes read, 99950 more expected)" in err, err
        assert err.split("urlopen error ", 1)[-1].split(":", 1)[0] in RETRYABLE_CODES, "retried by --retry-failed"
        ok = _answer("200 OK", [("Content-Length", 50)], b"x" * 50)
    with _server(ok) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
        assert _fetch(f"http://127.0.0.1:{port}/exact.png") == (b"x" * 50, None)


def _trickle(head: bytes):
    """Sends `head`, then one byte every 0.2 s until the client leaves (or 20 s: the test's bound)."""
    def respond(path, conn, stop):
        conn.sendall(head)
        end = time.monotonic() + 20
        while time.monotonic() < end and not stop.wait(0.2):
            conn.sendall(b"x")
    return respond


@pytest.mark.parametrize("phase, head", [
    ("body", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"),
    ("headers", b"HTTP/1.1 200 OK\r\nX-Slow: "),
])
def test_timeout_bounds_the_whole_request_not_each_read(guarded_worker, phase, head):
    with _server(_trickle(head)) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
        started = time.monotonic()
        body, err = _fetch(f"http://127.0.0.1:{port}/slow.png", timeout=1)
        took = time.monotonic() - started
    assert body is None and "timed out" in err, err
    assert took < 3, f"took {took:.1f} s with timeout 1 s"
    assert err.split("urlopen error ", 1)[-1].split(":", 1)[0] in RETRYABLE_CODES


def test_deadline_spans_redirect_hops(guarded_worker):
    """Each hop may be quick; together they still get one deadline."""
    def slow_hop(path, conn, stop):
        n = int(path.strip("/") or 0)
        stop.wait(0.3)
        conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: /{n + 1}\r\nContent-Length: 0\r\n"
                     f"Connection: close\r\n\r\n".encode())
    with _server(slow_hop) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), deadline_s=1)
        started = time.monotonic()
        body, err = _fetch(f"http://127.0.0.1:{port}/0", timeout=5)
        took = time.monotonic() - started
    assert body is None and "timed out" in err, err
    assert took < 2.5, f"took {took:.1f} s with a 1 s deadline"
