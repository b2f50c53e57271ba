"""The worker-side pieces of the download stage, without Spark: address policy, loopback-only mode,
and the header check + normalisation in front of img2dataset's resizer."""
import io
import socket

import numpy as np
import pytest
from PIL import Image

from udfs import netguard
from udfs.fetch import SafeResizer, normalise
from world.corpus import bomb_png


@pytest.fixture
def loopback_only():
    netguard.refuse_non_loopback()
    netguard.refused_attempts.clear()
    yield netguard.refused_attempts
    netguard.allow_any_connect()


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


def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


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
    data = _encode(im, "JPEG", exif=exif.tobytes())
    inner = _Echo()
    _, w, h, *_ , err = SafeResizer(inner, 10**8)(io.BytesIO(data))
    assert err is None and (w, h) == (20, 40)


def test_sixteen_bit_and_alpha_and_animation_become_8bit_rgb():
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(_encode(sixteen, "PNG"))))))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(_encode(transparent, "PNG"))))))
    assert out.getpixel((0, 0)) == (255, 255, 255), "alpha composited over white"
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = Image.open(io.BytesIO(normalise(Image.open(io.BytesIO(gif)))))
    assert out.mode == "RGB" and out.getpixel((0, 0))[2] > 200, "first frame"
    plain = Image.open(io.BytesIO(_encode(Image.new("RGB", (8, 8)), "JPEG")))
    assert normalise(plain) is None, "ordinary images pass through untouched"


def test_undecodable_bodies_get_a_stable_reason():
    resizer = SafeResizer(_Echo(), 10**8)
    for body in (b"", b"<html>not an image</html>", _encode(Image.new("RGB", (64, 64)), "JPEG")[:200]):
        *_, err = resizer(io.BytesIO(body))
        assert err.startswith("Image decoding error"), err
        assert "0x" not in err, "no memory addresses: details must be deterministic"
