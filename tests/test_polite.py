"""Politeness in a download worker (net/polite.py, the opener in net/fetch.py): per-host rate and
connection limits, Retry-After, retries by code with backoff, TDMRep, robots.txt. Loopback only."""
import codecs
import email.utils
import http.client
import re
import socket
import threading
import time
import urllib.error

import pytest
from img2dataset.downloader import download_image

from capfilt.net.polite import RETRYABLE_CODES, HostLimits, backoff_s, failure_code, is_exempt, retry_after_s
from tests.test_fetch import _answer, _canary, _server


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


@pytest.mark.slow
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
    from capfilt.net import robots as robots_txt
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
        assert refusal == public and public.startswith("robots_txt_unreachable: ") and f"answered {robots}" in public
    assert requests[0][0] == "/robots.txt" and len([p for p, _ in requests if p == "/robots.txt"]) == 1


def test_robots_txt_of_a_blocked_address_gives_no_verdict(guarded_worker):
    from capfilt.net import robots as robots_txt
    guarded_worker()  # nothing allow-listed: 127.0.0.1 is blocked by the address policy
    found = robots_txt.fetch("http://127.0.0.1:9", "capfilt", timeout=2)
    assert found.refusal("http://127.0.0.1:9/a.jpg", ("capfilt",)) is None, "the image request is blocked instead"


def test_robots_rule_matching_equals_the_regex_protego_builds_and_a_hostile_rule_is_fast():
    import random
    import re

    from capfilt.net.robots import glob_match, parse

    def as_regex(pattern, path):  # Protego's own translation: `*` -> lazy `.*?`, a final `$` anchors
        anchored = pattern.endswith("$")
        core = pattern[:-1] if anchored else pattern
        return re.match(".*?".join(map(re.escape, core.split("*"))) + ("$" if anchored else ""), path) is not None
    rng = random.Random(0)
    for _ in range(5000):
        pattern = "/" + "".join(rng.choice("ab*") for _ in range(rng.randint(0, 6))) + rng.choice(["", "$"])
        path = "/" + "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        assert glob_match(pattern, path) == as_regex(pattern, path), (pattern, path)
    hostile = parse(b"User-agent: *\nDisallow: /" + b"*a" * 30 + b"b\n")[0]  # backtracks for minutes as a regex
    started = time.monotonic()
    assert hostile.can_fetch("http://h/" + "a" * 40, "capfilt") and not hostile.can_fetch("http://h/" + "a" * 40 + "b", "capfilt")
    assert time.monotonic() - started < 1


# --- issue 32: robots.txt verdicts that were lost, Retry-After that stalled or failed rows ------------

ROBOTS = "User-agent: *\r\nDisallow: /private/\r\n"


def _robots_verdicts(guarded_worker, respond, **policy):
    """robots.txt fetched from a loopback server answering with `respond`: (refusal of /private/a.jpg,
    refusal of /img/a.jpg, the paths the server was asked for)."""
    from capfilt.net import robots as robots_txt
    paths = []

    def logged(path, conn, stop):
        paths.append(path)
        respond(path, conn, stop)
    with _server(logged) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), **policy)
        found = robots_txt.fetch(f"http://127.0.0.1:{port}", "capfilt", timeout=2)
    tokens = ("capfilt", "img2dataset")
    return (found.refusal(f"http://127.0.0.1:{port}/private/a.jpg", tokens),
            found.refusal(f"http://127.0.0.1:{port}/img/a.jpg", tokens), paths)


@pytest.mark.parametrize("body, charset", [
    (b"\xef\xbb\xbf" + ROBOTS.encode(), None),                      # UTF-8 with a byte-order mark (the issue)
    (b"\xef\xbb\xbf" + ROBOTS.encode(), "utf-8"),
    (ROBOTS.encode("utf-16"), None),                                  # UTF-16 with its BOM
    (codecs.BOM_UTF16_BE + ROBOTS.encode("utf-16-be"), None),
    (ROBOTS.encode("utf-16-le"), "utf-16le"),                         # no BOM, the charset says so
    (ROBOTS.encode("utf-16-be"), None),                               # no BOM, no charset: the NUL bytes say so
    (ROBOTS.encode("utf-32"), None),
    (ROBOTS.replace("\r\n", "\r").encode(), None),                    # old Mac line ends
    ("# café\r\nUser-agent: *\r\nDisallow: /private/\r\n".encode("latin-1"), "iso-8859-1"),
    ("User-agent: *\nDisallow: /priv\u00e9/\nDisallow: /private/\n".encode("latin-1"), None),
    (b"\xef\xbb\xbfUser-agent: other\nAllow: /\n" + b"\xef\xbb\xbf" + ROBOTS.encode(), None),  # two files, two BOMs
    (b"User-agent:\x0c*\nDisallow:\x0c/private/\x85# odd whitespace\n", None),
    (ROBOTS.encode(), "utf-16"),                                      # the charset is wrong: no NUL byte
], ids=["utf8-bom", "utf8-bom-charset", "utf16-bom", "utf16be-bom", "utf16le-charset", "utf16be-bare", "utf32-bom",
        "cr-only", "latin1-charset", "latin1-bare", "two-boms", "formfeed-nel", "utf8-declared-utf16"])
def test_robots_txt_in_any_encoding_keeps_its_disallow(guarded_worker, body, charset):
    content_type = "text/plain" + (f"; charset={charset}" if charset else "")
    answer = _answer("200 OK", [("Content-Type", content_type), ("Content-Length", len(body))], body)
    private, public, paths = _robots_verdicts(guarded_worker, answer)
    assert private and private.startswith("robots_txt: disallowed for capfilt"), private
    assert public is None and paths == ["/robots.txt"]


def test_a_non_utf8_disallow_matches_both_readings_of_its_bytes():
    from capfilt.net.robots import Robots, parse
    rules, named = parse("User-agent: *\nDisallow: /café/\n".encode("latin-1"))
    found = Robots("http://h", rules=rules, named=named)
    for path in ("/café/a.jpg", "/caf%C3%A9/a.jpg", "/caf%E9/a.jpg", "/caf%e9/a.jpg"):  # UTF-8 and raw-byte URLs
        assert found.refusal("http://h" + path, ("capfilt",)), path
    assert found.refusal("http://h/cafe/a.jpg", ("capfilt",)) is None


@pytest.mark.parametrize("headers", [
    [("X-Robots-Tag", "noai")], [("X-Robots-Tag", "noindex")], [("X-Robots-Tag", "capfilt: noindex, noai")],
    [("X-Robots-Tag", "img2dataset: noimageai")], [("tdm-reservation", "1")],
])
def test_opt_out_headers_on_robots_txt_itself_do_not_discard_its_rules(guarded_worker, headers):
    """The opt-out headers are about images; on robots.txt (where noindex is common) they made the file
    'no verdict', and the images its rules disallow were fetched."""
    body = ROBOTS.encode()
    private, public, _ = _robots_verdicts(
        guarded_worker, _answer("200 OK", [*headers, ("Content-Length", len(body))], body))
    assert private and private.startswith("robots_txt: disallowed for capfilt"), private
    assert public is None


def test_opt_out_headers_on_a_redirected_robots_txt_do_not_discard_its_rules(guarded_worker):
    body = ROBOTS.encode()

    def respond(path, conn, stop):
        if path == "/robots.txt":
            _answer("301 Moved", [("Location", "/r/robots.txt"), ("X-Robots-Tag", "noindex"),
                                  ("Content-Length", 0)])(path, conn, stop)
        else:
            _answer("200 OK", [("X-Robots-Tag", "noai"), ("Content-Length", len(body))], body)(path, conn, stop)
    private, public, paths = _robots_verdicts(guarded_worker, respond)
    assert private and private.startswith("robots_txt: disallowed") and public is None
    assert paths == ["/robots.txt", "/r/robots.txt"]


def test_a_robots_txt_over_500_kib_is_read_up_to_its_last_whole_line(guarded_worker):
    """Larger than max_bytes (a cap for images) and than RFC 9309's 500 KiB: its first 500 KiB are the
    rules, and the line the cut falls in is dropped (here an Allow that, cut, would allow /private/)."""
    from capfilt.net.robots import MAX_BYTES
    head = b"User-agent: *\nDisallow: /private/\n"
    padding = b"# " + b"x" * 98 + b"\n"
    body = head + padding * ((MAX_BYTES - len(head)) // len(padding))
    body += b"#" * (MAX_BYTES - len(body) - len(b"Allow: /private/")) + b"\nAllow: /private/"  # cut here
    assert len(body) == MAX_BYTES + 1
    body += b"but-only-this\n" + padding * 2000
    private, public, _ = _robots_verdicts(
        guarded_worker, _answer("200 OK", [("Content-Length", len(body))], body), max_bytes=10_000)
    assert private and private.startswith("robots_txt: disallowed"), private
    assert public is None


@pytest.mark.parametrize("target", ["http://127.0.0.1:{canary}/robots.txt", "ftp://127.0.0.1:{canary}/robots.txt"])
def test_a_robots_txt_redirected_to_a_blocked_address_disallows_the_host(guarded_worker, target):
    """The host's images are reachable, its rules are behind an address (or scheme) capfilt may not
    fetch: every row is disallowed, and nothing connects to the blocked address."""
    with _canary() as (canary, connections):
        location = target.format(canary=canary)
        private, public, _ = _robots_verdicts(
            guarded_worker, _answer("302 Found", [("Location", location), ("Content-Length", 0)]))
        assert connections() == 0
    assert private == public and public.startswith("robots_txt: ") and "redirects where capfilt may not go" in public


def test_an_unreachable_robots_txt_disallows_the_host_with_a_retryable_code(guarded_worker):
    from capfilt.pipelines.download import CODE_PATTERN
    private, public, _ = _robots_verdicts(guarded_worker, _answer("503 Busy", [("Content-Length", 0)]))
    assert private == public and re.match(CODE_PATTERN, public).group(1) == "robots_txt_unreachable"
    assert "robots_txt_unreachable" in RETRYABLE_CODES


def test_only_the_request_counts_against_the_robots_txt_deadline(guarded_worker, monkeypatch):
    """A fresh worker imported img2dataset's downloader (2-4 s cold) inside the robots.txt request: with
    download.timeout=5 hosts answering in 0.01 s were unreachable and all their rows disallowed. Here
    that import is made to take 1.5 s and the deadline is 1 s."""
    import importlib.abc
    import sys

    import img2dataset

    cold = []

    class SlowImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "img2dataset.downloader":
                cold.append(name)
                time.sleep(1.5)
            return None  # the normal finders import it
    monkeypatch.delitem(sys.modules, "img2dataset.downloader")  # cold, as in a fresh Python worker
    monkeypatch.setattr(img2dataset, "downloader", img2dataset.downloader)
    monkeypatch.setattr(sys, "meta_path", [SlowImport(), *sys.meta_path])
    body = ROBOTS.encode()

    def respond(path, conn, stop):  # headers, then the body: as http.server sends them
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        stop.wait(0.05)
        conn.sendall(body)
    from capfilt.net import robots as robots_txt
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))  # worker preparation: imports happen here
        found = robots_txt.fetch(f"http://127.0.0.1:{port}", "capfilt", timeout=1)
        base = f"http://127.0.0.1:{port}"
    assert found.refusal(f"{base}/img/a.jpg", ("capfilt",)) is None, "the host was reachable: its rules apply"
    assert found.refusal(f"{base}/private/a.jpg", ("capfilt",)).startswith("robots_txt: disallowed for capfilt")
    assert cold == ["img2dataset.downloader"], "the import was cold, and done once"


@pytest.mark.parametrize("value, seconds", [
    ("2", 2.0), ("0", 0.0), ("007", 7.0), (" 5\t", 5.0),
    ("²", None), ("٣", None), ("５", None), ("৩", None), ("1.5", None), ("-3", None), ("+3", None), ("1_0", None),
    ("5 5", None), ("1e3", None), ("", None), ("\u00a05", None), ("5\n", None), ("inf", None), ("nan", None),
    ("9" * 5000, 2.0 ** 31), ("99999999999", 2.0 ** 31),  # RFC 9111: an overflowing delta-seconds is 2^31
    ("Fri, 31 Dec 9999 23:59:59 GMT", 2.0 ** 31), ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("Mon, 01 Jan 0001 00:00:00 +0100", 0.0), ("Sun, 06 Nov 99999 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 99:49:37 GMT", None),
])
def test_retry_after_is_delta_seconds_in_ascii_digits_or_an_http_date(value, seconds):
    """RFC 9110 10.2.3: 1*DIGIT (ASCII) or an HTTP-date; anything else is ignored (None), never raised."""
    assert retry_after_s(value) == seconds


def test_retry_after_dates_without_a_zone_are_gmt():
    now = time.time()
    asctime = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(now + 60))
    assert retry_after_s(asctime, now=now) == pytest.approx(60, abs=1.5)


def test_a_429_with_a_retry_after_that_is_not_a_number_is_retried_as_usual(guarded_worker):
    """Retry-After: ² (byte 0xB2: headers are Latin-1) failed the row with 'other: could not convert
    string to float', not retried and not retryable."""
    arrivals = []

    def respond(path, conn, stop):
        arrivals.append(path)
        conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n"
                     if len(arrivals) == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nimage")
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), retries=1, backoff_s=0.01)
        assert _fetch(f"http://127.0.0.1:{port}/a.png") == (b"image", None)
    assert len(arrivals) == 2


@pytest.mark.parametrize("length", [b"\xb2", "٣".encode(), b"1_0", b"+5", b"-1", b"5, 5"],
                         ids=["superscript-two", "arabic-indic-three", "underscore", "plus", "negative", "list"])
def test_a_content_length_that_is_not_ascii_digits_fails_the_row_with_a_code(guarded_worker, length):
    """'²' passed str.isdigit() and int() raised ValueError: the row failed with a traceback's text."""
    def respond(path, conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\nConnection: close\r\n\r\nimage")
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",))
        body, err = _fetch(f"http://127.0.0.1:{port}/a.png")
    assert body is None and err.startswith("<urlopen error other: invalid Content-Length '"), err


def test_retry_after_answers_in_flight_together_count_once_and_a_success_starts_the_count_again():
    limits = HostLimits(rate=0, connections=0, max_answers=2)
    sent = time.monotonic()
    for _ in range(5):  # five requests sent together, five 429s: one answer
        limits.hold_off("a.example", 0.05, sent=sent)
    time.sleep(0.06)
    limits.acquire("a.example")()
    limits.answered("a.example", sent=time.monotonic())  # served: the next Retry-After is the first again
    limits.hold_off("a.example", 0.05, sent=time.monotonic())
    time.sleep(0.06)
    limits.acquire("a.example")()
    limits.hold_off("a.example", 0.05, sent=time.monotonic())  # the second in a row
    with pytest.raises(urllib.error.URLError, match="answered Retry-After 2 times in a row") as e:
        limits.acquire("a.example")
    assert failure_code(e.value) == "retry_after"
    limits.acquire("b.example")()  # other hosts are not given up


def test_retry_after_waits_past_the_host_budget_give_it_up():
    limits = HostLimits(rate=0, connections=0, budget_s=0.15)
    limits.hold_off("a.example", 0.1, sent=time.monotonic())
    limits.acquire("a.example")()
    limits.hold_off("a.example", 0.1, sent=time.monotonic())  # 0.2 s asked in all: over 0.15
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError, match=r"max_retry_after_total_s=0.15"):
        limits.acquire("a.example")
    assert time.monotonic() - started < 0.05, "no wait for a host given up"


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 2])
def test_a_host_answering_retry_after_forever_gets_exactly_three_429s(guarded_worker, retries):
    """Retry-After: 15 forever held a shard for 15 s per row (24 rows: 165 s). With one connection the
    host is asked three times (each after the last wait), then its rows fail at once, retryably."""
    respond, arrivals = _scripted(("429 Too Many Requests", [("Retry-After", "1")], b""))
    with _server(respond) as port:
        guarded_worker(allow_hosts=(f"127.0.0.1:{port}",), connections=1, retries=retries, backoff_s=0.01,
                       max_retry_after_answers=3, max_retry_after_total_s=300)
        started = time.monotonic()
        errors = [_fetch(f"http://127.0.0.1:{port}/{i}.png", timeout=2)[1] for i in range(8)]
        took = time.monotonic() - started
    assert len(arrivals) == 3, f"{len(arrivals)} requests"
    codes = [e.split("urlopen error ", 1)[-1].split(":", 1)[0] for e in errors]
    assert set(codes) <= {"http_429", "retry_after"} and codes[-1] == "retry_after" and set(codes) <= RETRYABLE_CODES
    assert took < 3.5, f"{took:.1f} s: two waits of 1 s, then nothing"


def test_rules_looked_up_by_prefix_give_protego_s_verdict_and_30000_rules_stay_fast():
    """Protego tried every rule for every URL (a 500 KiB robots.txt of 30,000 rules: 11 ms per URL, 15
    minutes for a host of 100,000 rows); the lookup by literal prefix gives the same verdict."""
    import random

    from capfilt.net.robots import glob_match, parse

    def protego_verdict(rule_set, url):  # Protego's own loop: rules sorted longest first, Allow first on a tie
        path = rule_set._quote_path(url)
        for rule in rule_set._rules:
            if glob_match(rule.value._pattern, path):
                return rule.field == "allow"
        return True
    rng = random.Random(1)
    for _ in range(400):
        lines = [f"{rng.choice(['Allow', 'Disallow'])}: /" + "".join(rng.choice("ab/*") for _ in range(rng.randint(0, 4)))
                 + rng.choice(["", "$"]) for _ in range(rng.randint(1, 8))]
        rules = parse(("User-agent: *\n" + "\n".join(lines)).encode())[0]
        rule_set = rules._user_agents["*"]
        for _ in range(10):
            url = "http://h/" + "".join(rng.choice("ab/") for _ in range(rng.randint(0, 7)))
            assert rules.can_fetch(url, "capfilt") == protego_verdict(rule_set, url), (lines, url)
    many = parse(b"User-agent: *\n" + b"".join(b"Disallow: /p%06d*x\n" % i for i in range(30_000)))[0]
    started = time.monotonic()
    verdicts = [many.can_fetch(f"http://h/p{i:06d}a{'x' if i % 2 else ''}.jpg", "capfilt") for i in range(2000)]
    assert time.monotonic() - started < 1, "2,000 URLs against 30,000 rules"
    assert verdicts == [i % 2 == 0 for i in range(2000)]


@pytest.mark.parametrize("encoding", ["gzip", "gzip-undeclared", "deflate", "br"])
def test_a_compressed_robots_txt_is_read_or_its_host_disallowed_for_the_run(guarded_worker, encoding):
    """capfilt asks for no Content-Encoding; a server that compresses anyway sent bytes that parsed as
    no rules (everything allowed). gzip and deflate are read; an encoding capfilt cannot read leaves the
    rules unknown: the host is disallowed for this run (retryable)."""
    import gzip
    import zlib
    body = {"deflate": zlib.compress(ROBOTS.encode()), "br": b"\x8b\x03\x80compressed"}.get(
        encoding, gzip.compress(ROBOTS.encode()))
    headers = [] if encoding == "gzip-undeclared" else [("Content-Encoding", encoding)]
    private, public, _ = _robots_verdicts(
        guarded_worker, _answer("200 OK", [*headers, ("Content-Length", len(body))], body))
    if encoding == "br":
        assert private == public and public.startswith("robots_txt_unreachable: ") and "could not be decoded" in public
    else:
        assert private and private.startswith("robots_txt: disallowed for capfilt") and public is None
