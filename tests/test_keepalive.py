"""Connections kept alive per host (net/fetch.py: ConnectionPool), checked against loopback servers' own
counts: reused over HTTP and HTTPS, never more per host than the connection limit, a server that closes
after each response, closes an idle connection or resets half-way through a body still gives every
request its outcome, garbage after a body and a failed connection are never reused, and a redirect on a
kept-alive connection to a blocked address is refused without a connection."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from img2dataset.downloader import download_image

from capfilt.world.server import serve
from capfilt.world.tls import CA_FILE, make_certificates
from helpers import loopback_server

N_FILES = 6


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("site")
    (root / "img").mkdir()
    for i in range(N_FILES):
        Image.new("RGB", (64, 48), (40 * i, 10, 10)).save(root / "img" / f"p{i}.png")
    return root


def _fetch(url, timeout=5):
    _, stream, err = download_image((0, url), timeout, "capfilt", None)
    return (stream.getvalue() if stream else None), err


def _pool():
    import urllib.request
    return urllib.request._opener.pool


@pytest.mark.parametrize("tls", [False, True])
def test_one_connection_serves_every_request_to_a_host_in_turn(site, tmp_path, guarded_worker, tls):
    folder = make_certificates(tmp_path / "tls") if tls else None
    guarded_worker(allow_hosts=("127.0.0.1",), ca_bundle=str(folder / CA_FILE) if tls else None)
    with serve(site, keep_alive=True, tls=folder) as server:
        for i in range(3 * N_FILES):
            body, err = _fetch(f"{server.base_url}/img/p{i % N_FILES}.png")
            assert err is None and body == (site / "img" / f"p{i % N_FILES}.png").read_bytes()
        assert server.connections == 1
    assert _pool().stats == {"127.0.0.1": {"connections": 1, "tls_handshakes": int(tls), "requests": 3 * N_FILES,
                                           "reused": 3 * N_FILES - 1}}


def test_connections_per_host_stay_within_the_limit_with_many_threads(site, guarded_worker):
    guarded_worker(allow_hosts=("127.0.0.1",), connections=2)
    with serve(site, keep_alive=True) as server:
        urls = [f"{server.base_url}/f/slow/30/p{i % N_FILES}.png" for i in range(40)]
        with ThreadPoolExecutor(8) as threads:
            results = list(threads.map(_fetch, urls))
        assert all(err is None and body for body, err in results)
        assert server.connections <= 2
    figures = _pool().stats["127.0.0.1"]
    assert figures["connections"] <= 2 and figures["requests"] == 40


def test_a_server_that_closes_after_each_response_or_while_idle_still_answers_every_request(site, guarded_worker):
    guarded_worker(allow_hosts=("127.0.0.1",))
    with serve(site) as server:  # HTTP/1.0: one request per connection
        assert all(_fetch(f"{server.base_url}/img/p{i}.png")[1] is None for i in range(N_FILES))
        assert server.connections == N_FILES
    assert _pool().stats["127.0.0.1"]["reused"] == 0
    with serve(site, keep_alive=True) as server:
        assert _fetch(f"{server.base_url}/img/p0.png")[1] is None
        server._server.hang_up_all()  # the server drops the idle connection
        body, err = _fetch(f"{server.base_url}/img/p1.png")
        assert err is None and body == (site / "img" / "p1.png").read_bytes()
        assert server.connections == 2


def test_a_body_cut_half_way_fails_its_row_alone_and_its_connection_is_not_reused(site, guarded_worker):
    guarded_worker(allow_hosts=("127.0.0.1",))
    with serve(site, keep_alive=True) as server:
        assert _fetch(f"{server.base_url}/img/p0.png")[1] is None
        body, err = _fetch(f"{server.base_url}/f/reset/p1.png")
        assert body is None and "reset" in err
        body, err = _fetch(f"{server.base_url}/img/p2.png")
        assert err is None and body == (site / "img" / "p2.png").read_bytes()
        assert server.connections == 2  # the reset one was not taken again


@contextlib.contextmanager
def _raw_keep_alive(answers):
    """A loopback server answering the requests of each connection in turn with answers[k] (raw bytes);
    yields (port, accepted connections)."""
    def serve(conn, stop):
        with conn:
            conn.settimeout(5)
            buffer, k = b"", 0
            try:
                while not stop.is_set() and k < len(answers):
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\r\n\r\n" in buffer and k < len(answers):
                        buffer = buffer.split(b"\r\n\r\n", 1)[1]
                        conn.sendall(answers[k])
                        k += 1
            except OSError:
                pass

    with loopback_server(serve) as served:
        yield served


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body) + body + extra


def test_garbage_after_a_body_closes_the_connection(guarded_worker):
    guarded_worker(allow_hosts=("127.0.0.1",))
    with _raw_keep_alive([_ok(b"first", b"GARBAGE AFTER THE BODY"), _ok(b"second")]) as (port, accepted):
        assert _fetch(f"http://127.0.0.1:{port}/a.png") == (b"first", None)
        assert _fetch(f"http://127.0.0.1:{port}/b.png") == (b"first", None)  # a new connection's first answer
        assert len(accepted) == 2


def test_a_redirect_to_a_blocked_address_on_a_kept_alive_connection_is_refused(guarded_worker):
    from test_fetch import _canary
    with _canary() as (canary, connections):
        redirect = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/x.png\r\nContent-Length: 0\r\n\r\n" % canary
        with _raw_keep_alive([_ok(b"first"), redirect]) as (port, accepted):
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
            assert _fetch(f"http://127.0.0.1:{port}/a.png") == (b"first", None)
            body, err = _fetch(f"http://127.0.0.1:{port}/b.png")
            assert body is None and "blocked_address" in err
            assert len(accepted) == 1  # the redirect came on the kept-alive connection
        assert connections() == 0


def test_the_opener_is_installed_per_shard_and_its_connections_outlive_the_shard(site, guarded_worker):
    """A reused Python worker gets urllib back as it was after a shard (bare img2dataset, another job's
    tasks), while the policy's kept-alive connections serve its next shard."""
    import urllib.request

    from capfilt.net.fetch import FetchPolicy, guarded
    guarded_worker()  # the fixture's clean-up: a fresh opener afterwards
    policy = FetchPolicy(loopback_only=True, allow_hosts=("127.0.0.1",))
    with serve(site, keep_alive=True) as server:
        urllib.request.install_opener(None)
        for _ in range(2):
            with guarded(policy) as opener:
                assert urllib.request._opener is opener
                assert _fetch(f"{server.base_url}/img/p0.png")[1] is None
            assert urllib.request._opener is None
        assert server.connections == 1 and opener.pool.stats["127.0.0.1"]["reused"] == 1
