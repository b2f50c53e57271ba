"""Politeness in a download worker (udfs/polite.py, the opener in udfs/fetch.py): per-host rate and
connection limits, Retry-After, retries by code with backoff, TDMRep. Loopback only."""
import email.utils
import http.client
import socket
import threading
import time
import urllib.error

import pytest
from img2dataset.downloader import download_image

from capfilt.udfs.polite import RETRYABLE_CODES, HostLimits, backoff_s, failure_code, is_exempt, retry_after_s
from tests.test_fetch import _answer, _server


def test_retry_after_reads_delta_seconds_and_http_dates():
    assert retry_after_s("2") == 2.0
    now = time.time()
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("-3") is None


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempt in range(4):
        waits = [backoff_s(attempt, 1.0) for _ in range(200)]
        assert 2 ** attempt / 2 <= min(waits) and max(waits) <= 2 ** attempt
        assert len(set(waits)) > 100, "jittered"
    assert backoff_s(20, 1.0) <= 60


@pytest.mark.parametrize("error, code", [
    (urllib.error.HTTPError("u", 404, "Not Found", {}, None), "http_404"),
    (urllib.error.HTTPError("u", 503, "Busy", {}, None), "http_503"),
    (urllib.error.HTTPError("u", 302, "The HTTP server returned a redirect error that would lead to an infinite "
                                      "loop.", {}, None), "redirect_loop"),
    (urllib.error.URLError(socket.timeout("timed out")), "timeout"),
    (TimeoutError("timed out: the request's total deadline has passed"), "timeout"),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "refused"),
    (ConnectionResetError(104, "Connection reset by peer"), "reset"),
    (http.client.IncompleteRead(b"x", 10), "reset"),
    (http.client.RemoteDisconnected("Remote end closed connection without response"), "reset"),
    (urllib.error.URLError(OSError("cannot resolve nowhere.invalid: [Errno -2] Name or service not known")), "dns"),
    (urllib.error.URLError("blocked_address: 10.0.0.1 (private) not allowed"), "blocked_address"),
    (urllib.error.URLError("tdm_reservation: opted_out by the TDMRep header"), "tdm_reservation"),
    (ValueError("something else"), "other"),
])
def test_failure_codes(error, code):
    assert failure_code(error) == code


def test_retryable_codes_are_the_transient_ones():
    assert {"timeout", "reset", "refused", "dns", "http_429", "http_503", "http_500"} <= RETRYABLE_CODES
    assert not {"http_403", "http_404", "http_410", "blocked_address", "x_robots_tag", "tdm_reservation",
                "robots_txt", "redirect_loop"} & RETRYABLE_CODES


def _hammer(limits, host, n, threads, hold_s=0.0):
    """n acquires of `host` from `threads` threads; returns the start times and the most held at once."""
    starts, lock, held, most = [], threading.Lock(), [0], [0]

    def work(k):
        for _ in range(k):
            release = limits.acquire(host)
            with lock:
                starts.append(time.monotonic())
                held[0] += 1
                most[0] = max(most[0], held[0])
            time.sleep(hold_s)
            with lock:
                held[0] -= 1
            release()
    pool = [threading.Thread(target=work, args=(n // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sorted(starts), most[0]


def _most_in_one_second(starts):
    return max(sum(1 for t in starts if s <= t < s + 1) for s in starts)


def test_rate_holds_across_threads_and_a_shared_host_gets_its_share():
    starts, _ = _hammer(HostLimits(rate=20, connections=0), "a.example", 30, threads=6)
    assert _most_in_one_second(starts) <= 21
    assert starts[-1] - starts[0] >= 29 / 20 * 0.95
    shared, _ = _hammer(HostLimits(rate=20, connections=0, shares={"a.example": 2}), "a.example", 12, threads=4)
    assert shared[-1] - shared[0] >= 11 / 10 * 0.95, "half the budget in each of 2 shards"


def test_connections_per_host_are_capped_and_other_hosts_are_not_held_up():
    limits = HostLimits(rate=0, connections=2)
    _, most = _hammer(limits, "a.example", 16, threads=8, hold_s=0.02)
    assert most == 2
    release = [limits.acquire("a.example"), limits.acquire("a.example")]
    started = time.monotonic()
    limits.acquire("b.example")()  # a's slots are full: b's are its own
    assert time.monotonic() - started < 0.05
    for r in release:
        r()


def test_hold_off_stops_every_request_to_the_host_and_a_too_long_wait_fails_fast():
    limits = HostLimits(rate=0, connections=0, max_wait_s=5)
    limits.hold_off("a.example", 0.5)
    started = time.monotonic()
    limits.acquire("a.example")()
    assert time.monotonic() - started >= 0.5
    limits.hold_off("a.example", 60)
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError, match="^<urlopen error retry_after: ") as e:
        limits.acquire("a.example")
    assert failure_code(e.value) == "retry_after" and time.monotonic() - started < 0.1


def test_exempt_endpoints_match_host_and_port():
    entries = (("127.0.0.1", 8000), ("mirror.internal", None))
    assert is_exempt("http://127.0.0.1:8000/a.jpg", entries)
    assert not is_exempt("http://127.0.0.1:8001/a.jpg", entries)
    assert is_exempt("https://MIRROR.internal/a.jpg", entries) and not is_exempt("http://other/a.jpg", entries)


def _fetch(url, timeout=5):
    _, stream, err = download_image((0, url), timeout, "capfilt", None)
    return stream.getvalue() if stream else None, err


def _scripted(*answers):
    """A server answering each request with the next of `answers` (the last one repeats); logs arrival times."""
    arrivals = []

    def respond(path, conn, stop):
        arrivals.append(time.monotonic())
        status, headers, body = answers[min(len(arrivals), len(answers)) - 1]
        _answer(status, [*headers, ("Content-Length", len(body))], body)(path, conn, stop)
    return respond, arrivals


def test_retryable_failures_are_retried_with_backoff_and_others_never(guarded_worker):
    respond, arrivals = _scripted(("503 Busy", [], b""), ("500 Oops", [], b""), ("200 OK", [], b"image"))
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), retries=2, backoff_s=0.2)
        assert _fetch(f"http://127.0.0.1:{port}/a.png") == (b"image", None)
    assert len(arrivals) == 3
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, f"backoff 0.1-0.2 s then 0.2-0.4 s: {gaps}"
    for status in ("404 Not Found", "403 Forbidden", "410 Gone"):
        respond, arrivals = _scripted((status, [], b""))
        with _server(respond) as port:
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), retries=3, backoff_s=0.01)
            body, err = _fetch(f"http://127.0.0.1:{port}/a.png")
        assert body is None and f"http_{status[:3]}: HTTP Error {status[:3]}" in err and len(arrivals) == 1


def test_a_final_failure_names_its_code_first(guarded_worker):
    respond, arrivals = _scripted(("503 Busy", [], b""))
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), retries=1, backoff_s=0.01)
        body, err = _fetch(f"http://127.0.0.1:{port}/a.png")
    assert err == "<urlopen error http_503: HTTP Error 503: Busy>" and len(arrivals) == 2


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_holds_the_host_then_the_row_downloads(guarded_worker, form):
    header = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    respond, arrivals = _scripted(("429 Too Many Requests", [("Retry-After", header)], b""), ("200 OK", [], b"image"))
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), retries=1, backoff_s=0.01)
        assert _fetch(f"http://127.0.0.1:{port}/a.png") == (b"image", None)
    assert arrivals[1] - arrivals[0] >= 0.9, "no request before Retry-After has passed"


def test_tdm_reservation_opts_out_unless_turned_off(guarded_worker):
    png = b"\x89PNG" + b"x" * 20
    for value, opted in (("1", True), ("0", False)):
        with _server(_answer("200 OK", [("tdm-reservation", value), ("Content-Length", len(png))], png)) as port:
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
            body, err = _fetch(f"http://127.0.0.1:{port}/a.png")
            assert (body is None and err.startswith("<urlopen error tdm_reservation: opted_out")) if opted \
                else body == png
            guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), tdm_reservation=False)
            assert _fetch(f"http://127.0.0.1:{port}/a.png")[0] == png


def test_connection_limit_is_released_on_errors_and_redirects(guarded_worker):
    """One connection per host: 404s, redirects and bodies must each give their slot back, or the
    next request would wait forever."""
    def respond(path, conn, stop):
        if path.startswith("/hop"):
            _answer("302 Found", [("Location", "/end.png"), ("Content-Length", 0)])(path, conn, stop)
        elif path.startswith("/missing"):
            _answer("404 Not Found", [("Content-Length", 0)])(path, conn, stop)
        else:
            _answer("200 OK", [("Content-Length", 5)], b"image")(path, conn, stop)
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), connections=1)
        started = time.monotonic()
        for _ in range(3):
            assert _fetch(f"http://127.0.0.1:{port}/missing.png", timeout=2)[0] is None
            assert _fetch(f"http://127.0.0.1:{port}/hop.png", timeout=2) == (b"image", None)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("robots, verdict", [
    ("User-agent: *\nDisallow: /private/\n", "rules"),
    ({"location": "/r/moved/robots.txt", "body": "User-agent: *\nDisallow: /private/\n"}, "rules"),
    (404, "allow"), (410, "allow"), (500, "disallow"), (503, "disallow"), (429, "disallow"),
])
def test_robots_txt_outcomes_follow_rfc_9309(guarded_worker, tmp_path, robots, verdict):
    from capfilt.udfs import robots as robots_txt
    from capfilt.world.server import serve
    (tmp_path / "img").mkdir()
    with serve(tmp_path, robots=robots) as server:
        guarded_worker(allow_hosts=(f"127.0.0.1:{server.port}",))
        found = robots_txt.fetch(server.base_url, "capfilt", timeout=2)
        requests = server.requests
    refusal = found.refusal(server.base_url + "/private/a.jpg", ("capfilt", "img2dataset"))
    public = found.refusal(server.base_url + "/img/a.jpg", ("capfilt", "img2dataset"))
    if verdict == "rules":
        assert refusal.startswith("robots_txt: disallowed for capfilt by ") and public is None
    elif verdict == "allow":
        assert refusal is None and public is None
    else:
        assert refusal == public and f"answered {robots}" in public
    assert requests[0][0] == "/robots.txt" and len([p for p, _ in requests if p == "/robots.txt"]) == 1


def test_robots_txt_of_a_blocked_address_gives_no_verdict(guarded_worker):
    from capfilt.udfs import robots as robots_txt
    guarded_worker()  # nothing allow-listed: 127.0.0.1 is blocked by the address policy
    found = robots_txt.fetch("http://127.0.0.1:9", "capfilt", timeout=2)
    assert found.refusal("http://127.0.0.1:9/a.jpg", ("capfilt",)) is None, "the image request is blocked instead"


def test_robots_rule_matching_equals_the_regex_protego_builds_and_a_hostile_rule_is_fast():
    import random
    import re

    from capfilt.udfs.robots import _parse, glob_match

    def as_regex(pattern, path):  # Protego's own translation: `*` -> lazy `.*?`, a final `$` anchors
        anchored = pattern.endswith("$")
        core = pattern[:-1] if anchored else pattern
        return re.match(".*?".join(map(re.escape, core.split("*"))) + ("$" if anchored else ""), path) is not None
    rng = random.Random(0)
    for _ in range(5000):
        pattern = "/" + "".join(rng.choice("ab*") for _ in range(rng.randint(0, 6))) + rng.choice(["", "$"])
        path = "/" + "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        assert glob_match(pattern, path) == as_regex(pattern, path), (pattern, path)
    hostile = _parse("User-agent: *\nDisallow: /" + "*a" * 30 + "b\n")  # backtracks for minutes as a regex
    started = time.monotonic()
    assert hostile.can_fetch("http://h/" + "a" * 40, "capfilt") and not hostile.can_fetch("http://h/" + "a" * 40 + "b", "capfilt")
    assert time.monotonic() - started < 1
