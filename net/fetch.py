"""What runs inside the download workers around img2dataset's own Downloader and Resizer.

img2dataset fetches with `urllib.request.urlopen`, i.e. through the process-wide opener. Each worker
installs ours before a shard starts: every connection (redirect hops included) goes through the
address policy of capfilt.net.netguard, proxies from the environment are ignored, opt-out headers are
honoured for capfilt's token and img2dataset's, bodies are capped in size and must be as long as
declared, only http(s) is ever fetched (redirects included), and one deadline bounds the whole request
(redirect hops and body reads included). SafeResizer reads the
image header before img2dataset decodes anything, so a decompression bomb never reaches memory,
normalises what OpenCV mishandles (EXIF rotation, 16-bit, CMYK, palette/alpha, animation) with PIL,
and decodes a large plain JPEG at reduced size (net/reduced_decode.py).
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import re
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import numpy as np
from PIL import Image, ImageOps

from capfilt.net import netguard
from capfilt.net.polite import RETRYABLE_CODES, HostLimits, backoff_s, failure_code, is_exempt, retry_after_s
from capfilt.net.reduced_decode import reduced_resize, reduction

OPTED_OUT_MARK = "opted_out"
TOO_LARGE_MARK = "response_too_large"


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...] = ()
    loopback_only: bool = False
    max_bytes: int = 32 * 1024 * 1024
    user_agent_tokens: tuple[str, ...] = ("capfilt", "img2dataset")
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # Seconds for a whole urlopen + read (connect, TLS, headers, body, every redirect hop).
    # None: the timeout the caller passes to urlopen (img2dataset passes download.timeout).
    deadline_s: float | None = None
    tdm_reservation: bool = True          # a "tdm-reservation: 1" response header opts the image out
    # Politeness (net/polite.py): per host for the whole job; 0 = unlimited.
    requests_per_second: float = 0.0
    connections: int = 0
    host_shares: tuple[tuple[str, int], ...] = ()  # hosts whose budget is shared by several shards
    retries: int = 0                      # retries of a retryable failure, with backoff
    backoff_s: float = 1.0
    max_retry_after_s: float = 300.0
    max_retry_after_answers: int = 0      # Retry-After answers in a row after which a host is given up; 0 = never
    max_retry_after_total_s: float = 0.0  # Retry-After seconds per host after which it is given up; 0 = no budget
    exempt: tuple[tuple[str, int | None], ...] = ()  # endpoints without rate/connection limits
    ca_bundle: str | None = None          # PEM of the CAs HTTPS is checked against (None: the system's)
    retry_tls: bool = False               # a tls failure is retryable
    # A fresh opener (and HostLimits) per run: Python workers outlive a run, and a host given up (or held
    # off) in one run must be asked again by the next (--retry-failed in the same session).
    run: str = ""


class _Limits(urllib.request.BaseHandler):
    """Opt-out headers and a body size cap, on every response, and what the host said about our pace
    (Retry-After). A robots.txt request (net/robots.py marks it, and the mark follows its redirects)
    is exempt from the opt-out headers and the size cap: those are about images, and a robots.txt
    served with `X-Robots-Tag: noindex` (common) still holds the host's rules; robots.py reads its
    first 500 KiB whatever its length."""

    handler_order = 400  # before HTTPErrorProcessor, so redirect hops are checked too

    def __init__(self, policy: FetchPolicy, limits: HostLimits):
        # Imported here, when the worker installs the opener: an import inside a request (img2dataset's
        # downloader takes ~2-4 s cold) would count against that request's deadline.
        from img2dataset.downloader import is_disallowed
        self.is_disallowed = is_disallowed
        self.policy = policy
        self.limits = limits

    def http_response(self, request, response):
        host, exempt = _budget(request.full_url, self.policy)
        sent = getattr(request, "capfilt_sent", None)
        if not 200 <= response.status < 300:
            response.capfilt_release()  # its body is never read: the connection slot is free
        wait = retry_after_s(response.headers.get("Retry-After")) if response.status in (429, 503) else None
        if wait is not None:
            self.limits.hold_off(host, wait, exempt, sent)
        elif response.status < 400:
            self.limits.answered(host, exempt, sent)
        robots = getattr(request, "capfilt_robots", None) is not None
        directives = set(self.policy.opt_out_directives) if not robots else set()
        if directives:
            for token in self.policy.user_agent_tokens:
                if self.is_disallowed(response.headers, token, directives):
                    response.close()
                    raise urllib.error.URLError(
                        f"x_robots_tag: {OPTED_OUT_MARK} by X-Robots-Tag {response.headers.get_all('X-Robots-Tag')} "
                        f"(Use of image disallowed by X-Robots-Tag directive)")
        if self.policy.tdm_reservation and not robots and (response.headers.get("tdm-reservation") or "").strip() == "1":
            response.close()
            raise urllib.error.URLError(f"tdm_reservation: {OPTED_OUT_MARK} by the TDMRep header tdm-reservation: 1")
        limit = self.policy.max_bytes
        # Content-Length is 1*DIGIT (RFC 9110 8.6), else the framing is invalid (RFC 9112 6.3): the body is
        # not read. str.isdigit() took '²', whose int() then raised ValueError here; http.client's int()
        # takes '٣', '1_0' and '+5' and ignores '²' (response.length: what it believed).
        declared = response.headers.get("Content-Length")
        if declared is not None and not response.chunked and not re.fullmatch(r"[ \t]*[0-9]+[ \t]*", declared):
            response.close()
            raise urllib.error.URLError(f"other: invalid Content-Length {declared[:50]!r}")
        if not robots and response.length is not None and response.length > limit:
            response.close()
            raise urllib.error.URLError(f"{TOO_LARGE_MARK}: Content-Length {response.length} > {limit} bytes")
        read = response.read

        def capped_read(amt=None):
            want = limit + 1 if amt is None or amt < 0 else amt
            data = read(want)
            if amt is None and len(data) > limit:
                raise urllib.error.URLError(f"{TOO_LARGE_MARK}: body over {limit} bytes")
            # http.client returns a short body silently when the peer closes before Content-Length
            # bytes: it would end as a truncated image (not retried) instead of a retryable download.
            if len(data) < want and response.length:
                raise http.client.IncompleteRead(data, response.length)
            return data

        response.read = capped_read
        return response

    https_response = http_response


_FETCHED_SCHEMES = ("http", "https")


def _refuse_scheme(url: str, fp=None) -> None:
    scheme = urlparse(url).scheme  # lower-cased by urlparse: FTP:// is ftp
    if scheme not in _FETCHED_SCHEMES:
        if fp is not None:
            fp.close()
        raise urllib.error.URLError(f"{netguard.BLOCKED_MARK}: scheme {scheme or '(none)'!r} in {url[:200]!r} "
                                    f"is not fetched (only http and https)")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp too (a plain socket outside the address policy) and refuses other
    schemes with an HTTPError that does not say why: refuse every non-http(s) hop as blocked, before
    any connection, and carry the request's deadline to the next hop."""

    def http_error_302(self, req, fp, code, msg, headers):
        robots = getattr(req, "capfilt_robots", None)
        if robots is not None:
            robots["redirects"] += 1  # a robots.txt whose redirect is blocked is not "the host is blocked"
        location = headers["location"] if "location" in headers else headers["uri"] if "uri" in headers else None
        if location is not None and urlparse(location).scheme not in _FETCHED_SCHEMES + ("",):
            _refuse_scheme(location, fp)  # else urllib raises an HTTPError that does not say blocked
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _refuse_scheme(newurl, fp)  # the absolute URL urllib would open next: the check that matters
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.capfilt_deadline = getattr(req, "capfilt_deadline", None)
            if hasattr(req, "capfilt_robots"):
                new.capfilt_robots = req.capfilt_robots
        return new


class _OnlyHttp(urllib.request.BaseHandler):
    """Whatever scheme no handler opens (ftp, file, data, gopher...) ends as blocked, not as urlopen
    returning None (what an OpenerDirector does without urllib's UnknownHandler)."""

    def unknown_open(self, req):
        _refuse_scheme(req.full_url)


def _deadline_passed() -> TimeoutError:
    return TimeoutError("timed out: the request's total deadline has passed")


class _DeadlineReader(io.RawIOBase):
    """The response's socket reads, each allowed only what is left of the request's deadline: a socket
    timeout applies per recv, so a server trickling a byte at a time could hold a worker forever."""

    def __init__(self, sock, deadline: float):
        self.raw = sock.makefile("rb", buffering=0)  # keeps the fd open after urllib closes `sock`
        self.sock = sock
        self.deadline = deadline
        self.holding = False  # True: answer "nothing yet" without touching the socket (a peek at the buffer)

    def readable(self):
        return True

    def readinto(self, b):
        if self.holding:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _deadline_passed()
        timeout = self.sock.gettimeout()
        self.sock.settimeout(left if timeout is None else min(timeout, left))
        return self.raw.readinto(b)

    def close(self):
        self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTPResponse whose status line, headers and body all come through a _DeadlineReader."""

    def __init__(self, sock, *args, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain file made by HTTPResponse; headers are read from ours
        self.capfilt_reader = _DeadlineReader(sock, deadline)
        self.fp = io.BufferedReader(self.capfilt_reader)
        self.capfilt_overran = False  # bytes after the body were read with it: the connection is not reused

    def _close_conn(self):
        fp = self.fp
        if fp is not None and not fp.closed:
            self.capfilt_reader.holding = True
            try:
                self.capfilt_overran = bool(fp.peek(1))  # what the buffer holds past the body, if anything
            except (OSError, ValueError):
                self.capfilt_overran = True
            self.capfilt_reader.holding = False
        super()._close_conn()


def _guarded(connection_class, addresses: netguard.AddressPolicy):
    """`connection_class` connecting through the address policy and, given a deadline, within it."""

    class Guarded(connection_class):
        def __init__(self, *args, deadline: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = self._connect
            self.renew(deadline)

        def renew(self, deadline: float | None) -> None:
            """The next request's deadline (a kept-alive connection serves several)."""
            self._deadline = deadline
            self.response_class = functools.partial(_DeadlineResponse, deadline=deadline) \
                if deadline is not None else http.client.HTTPResponse
            if deadline is not None and self.sock is not None:  # sending the request gets what is left
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))

        def _connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
            if self._deadline is None:
                return addresses.create_connection(address, timeout, source_address)
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise _deadline_passed()
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT and timeout is not None:
                left = min(left, timeout)
            sock = addresses.create_connection(address, left, source_address)
            # What is left bounds the TLS handshake and sending the request too.
            sock.settimeout(max(self._deadline - time.monotonic(), 0.001))
            return sock

    return Guarded


def _budget(url: str, policy: FetchPolicy) -> tuple[str, bool]:
    """The host a politeness budget is kept for (the URL's host name, lower-cased, without port), and
    whether it is exempt from the limits."""
    return (urlsplit(url).hostname or "").lower(), is_exempt(url, policy.exempt)


class _Fetched(io.BytesIO):
    """A response whose body has been read: what img2dataset's download_image uses of one."""

    def __init__(self, body: bytes, response):
        super().__init__(body)
        self.headers, self.status, self.url = response.headers, response.status, response.url


def _dropped(sock) -> bool:
    """An idle connection the server has closed, or sent anything on (neither is reused)."""
    if sock is None or getattr(sock, "pending", lambda: 0)():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class ConnectionPool:
    """The kept-alive connections of one worker process, by (scheme, host:port), and what they did, by host.

    A connection goes back to the pool only when its response was read to the end of its framing, the
    server did not ask to close, and nothing past the body arrived; it is taken again only if the server
    has neither closed it nor sent anything since, and within IDLE_S. A new connection to a host is
    opened only when none of the host's is idle, and then one idle under another scheme or port of the
    same host is closed: the host's open connections are never more than its requests in flight
    (HostLimits), so `max_connections_per_host` bounds pooled connections too."""

    IDLE_S = 30.0

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[tuple[object, float]]] = {}
        self.stats: dict[str, dict[str, int]] = {}  # host -> connections, tls_handshakes, requests, reused

    def count(self, host: str, **add: int) -> None:
        with self._lock:
            figures = self.stats.setdefault(host, {"connections": 0, "tls_handshakes": 0, "requests": 0, "reused": 0})
            for key, n in add.items():
                figures[key] += n

    def take(self, key: tuple[str, str]):
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn, since = idle.pop()
            if time.monotonic() - since <= self.IDLE_S and not _dropped(conn.sock):
                return conn
            conn.close()

    def make_room(self, key: tuple[str, str], host: str) -> None:
        """Close one idle connection of `host` under another key (scheme or port)."""
        with self._lock:
            for other, idle in self._idle.items():
                if other != key and idle and _host_of(other[1]) == host:
                    conn, _ = idle.pop(0)
                    break
            else:
                return
        conn.close()

    def give(self, key: tuple[str, str], conn) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append((conn, time.monotonic()))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def _host_of(authority: str) -> str:
    return (urlsplit(f"//{authority}").hostname or "").lower()


def _reusable(response) -> bool:
    return (not response.will_close and response.isclosed() and not getattr(response, "capfilt_overran", True)
            and not getattr(response, "capfilt_failed", False))


def _pooled_open(pool: ConnectionPool, connection_class, req, deadline: float | None, **kwargs):
    """urllib's do_open on a kept-alive connection of the pool when one is idle, else on a new one: the
    request (HTTP/1.1, no `Connection: close`), its response, and on close the connection back to the
    pool or closed. A kept-alive connection the server closed meanwhile (the request fails before any
    answer) is replaced by a new one once, within the same deadline."""
    if not req.host:
        raise urllib.error.URLError("no host given")
    key, host = (req.type, req.host), _host_of(req.host)
    headers = {**{k: v for k, v in req.headers.items() if k not in req.unredirected_hdrs}, **req.unredirected_hdrs}
    headers = {name.title(): value for name, value in headers.items() if name.lower() != "connection"}

    def send(conn):
        conn.request(req.get_method(), req.selector, req.data, headers,
                     encode_chunked=req.has_header("Transfer-encoding"))
        return conn.getresponse()

    def fresh():
        pool.make_room(key, host)
        pool.count(host, connections=1, tls_handshakes=int(req.type == "https"))
        return connection_class(req.host, timeout=req.timeout, deadline=deadline, **kwargs)

    conn = pool.take(key)
    reused = conn is not None
    if reused:
        conn.renew(deadline)
    else:
        conn = fresh()
    pool.count(host, requests=1, reused=int(reused))
    try:
        try:
            response = send(conn)
        except (ConnectionError, ssl.SSLEOFError, http.client.BadStatusLine, http.client.ImproperConnectionState):
            if not reused:
                raise
            conn.close()  # closed by the server while idle (or left unusable): one new connection
            conn = fresh()
            response = send(conn)
    except OSError as err:
        conn.close()
        raise urllib.error.URLError(err) from err
    except BaseException:
        conn.close()
        raise
    response.url, response.msg = req.get_full_url(), response.reason
    close = response.close

    def close_or_keep():
        try:
            close()
        finally:
            if _reusable(response):
                pool.give(key, conn)
            else:
                conn.close()
    response.close = close_or_keep
    return response


class _PoliteOpener(urllib.request.OpenerDirector):
    """open() = request + whole body, retried on a retryable failure (net/polite.py: RETRYABLE_CODES)
    with exponential backoff and jitter; Retry-After holds off the host's other requests too. A final
    failure is raised as '<code>: <what happened>', the code first."""

    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        if getattr(fullurl, "redirect_dict", None) is not None:  # a redirect hop, inside an attempt
            return super().open(fullurl, data, timeout)
        for attempt in range(self.policy.retries + 1):
            if attempt and hasattr(fullurl, "capfilt_deadline"):
                del fullurl.capfilt_deadline  # each attempt has its own deadline
            try:
                with super().open(fullurl, data, timeout) as response:
                    return _Fetched(response.read(), response)
            except Exception as e:
                if isinstance(e, urllib.error.HTTPError):
                    e.close()
                code = failure_code(e)
                retryable = code in RETRYABLE_CODES or code == "tls" and self.policy.retry_tls
                if attempt == self.policy.retries or not retryable or code == "retry_after":
                    text = str(e.reason) if isinstance(e, urllib.error.URLError) and not isinstance(
                        e, urllib.error.HTTPError) else str(e)
                    raise urllib.error.URLError(text if text.startswith(f"{code}: ") else f"{code}: {text}") from e
                time.sleep(backoff_s(attempt, self.policy.backoff_s))


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """Only the handlers a download needs. urllib.request.build_opener would add FTPHandler (a plain
    socket, outside the address policy), FileHandler, DataHandler, UnknownHandler and a ProxyHandler
    reading the environment (the proxy would become the peer we check)."""
    addresses = netguard.AddressPolicy(list(policy.allow_hosts))
    limits = HostLimits(policy.requests_per_second, policy.connections, dict(policy.host_shares),
                        policy.max_retry_after_s, policy.max_retry_after_answers, policy.max_retry_after_total_s)
    http_connection = _guarded(http.client.HTTPConnection, addresses)
    https_connection = _guarded(http.client.HTTPSConnection, addresses)

    def deadline(req) -> float | None:
        # Set on the first hop; _HttpOnlyRedirects copies it to the next ones.
        if not hasattr(req, "capfilt_deadline"):
            budget = policy.deadline_s
            if budget is None and isinstance(req.timeout, (int, float)):
                budget = req.timeout
            req.capfilt_deadline = None if budget is None else time.monotonic() + budget
        return req.capfilt_deadline

    def polite_open(do_open, connection, req, **kwargs):
        """Each hop waits for its host's turn and a free connection (before its deadline starts)."""
        release = limits.acquire(*_budget(req.full_url, policy))
        req.capfilt_sent = time.monotonic()  # which Retry-After answers are one (HostLimits.hold_off)
        try:
            response = do_open(connection, req, deadline=deadline(req), **kwargs)
        except BaseException:
            release()
            raise
        close = response.close

        def close_and_release():
            try:
                close()
            finally:
                release()
        response.close, response.capfilt_release = close_and_release, release
        return response

    pool = ConnectionPool()
    pooled_open = functools.partial(_pooled_open, pool)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return polite_open(pooled_open, http_connection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return polite_open(pooled_open, https_connection, req, context=self._context)

    opener = _PoliteOpener(policy)
    opener.pool = pool
    for handler in (GuardedHTTPHandler(), GuardedHTTPSHandler(context=tls_context(policy.ca_bundle)), _OnlyHttp(), _HttpOnlyRedirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    _Limits(policy, limits)):
        opener.add_handler(handler)
    return opener


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Certificates checked, names matched, TLS 1.2 and up: against ca_bundle's CAs, or the system's
    (which SSL_CERT_FILE and SSL_CERT_DIR replace)."""
    context = ssl.create_default_context(cafile=ca_bundle or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_ca_bundle(path: str | None) -> None:
    """download.ca_bundle on the driver, before any work: a readable file holding at least one certificate
    (else one line, not every HTTPS row failing as tls)."""
    if not path:
        return
    if not Path(path).is_file():
        raise ValueError(f"download.ca_bundle {path}: no such file (a PEM file of CA certificates)")
    try:
        context = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ValueError(f"download.ca_bundle {path}: holds no certificate a TLS client can load ({e})") from None
    stats = context.cert_store_stats()
    if not stats.get("x509", 0):
        raise ValueError(f"download.ca_bundle {path}: holds no certificate (a PEM file of CA certificates)")


_installed: FetchPolicy | None = None
_opener: urllib.request.OpenerDirector | None = None


def prepare_worker(policy: FetchPolicy) -> None:
    """Install the guarded opener of `policy` in this (reused) worker process; built once per policy."""
    global _installed, _opener
    if _installed != policy:
        if policy.loopback_only:
            netguard.refuse_non_loopback()
        else:
            netguard.allow_any_connect()
        if _opener is not None:
            _opener.pool.close()  # another run's kept-alive connections
        _opener, _installed = build_opener(policy), policy
    urllib.request.install_opener(_opener)


@contextlib.contextmanager
def guarded(policy: FetchPolicy):
    """The guarded opener of `policy` installed for a with-block (a shard, a robots.txt pass) and the opener
    that was there put back after, so that a reused Python worker running other code later (another job's
    tasks, bare img2dataset) gets urllib as it was; the kept-alive connections stay with the policy's opener."""
    previous = urllib.request._opener
    prepare_worker(policy)
    try:
        yield _opener
    finally:
        urllib.request.install_opener(previous)


class GuardedDownloader:
    """img2dataset's Downloader, run after prepare_worker. Picklable: shipped to executors as is.
    A shard is an Arrow file (img2dataset's Reader) or a planned folder of Parquet (plan_shards), which
    becomes that Arrow file first, its rows in plan order."""

    def __init__(self, downloader, policy: FetchPolicy, tmp_dir: str | None = None):
        self.downloader = downloader
        self.policy = policy
        self.tmp_dir = tmp_dir

    def __call__(self, row):
        with guarded(self.policy) as opener:
            before = {host: dict(figures) for host, figures in opener.pool.stats.items()}
            try:
                return self._download(row)
            finally:
                self._report(row[0], before, opener.pool.stats)

    def _report(self, shard_id: int, before: dict, after: dict) -> None:
        """This shard's connection figures by host (ConnectionPool.stats, the difference this shard made):
        <shard>_connections.json beside img2dataset's <shard>_stats.json, summed at commit
        (pipelines/download_stage.py: connection_stats)."""
        import fsspec
        changed = {host: {k: v - before.get(host, {}).get(k, 0) for k, v in figures.items()}
                   for host, figures in list(after.items())}
        changed = {host: f for host, f in changed.items() if f["requests"]}
        if not changed:
            return
        name = f"{str(shard_id).zfill(self.downloader.oom_shard_count)}_connections.json"
        fs, folder = fsspec.core.url_to_fs(self.downloader.output_folder)
        fs.pipe(f"{folder}/{name}", json.dumps(changed).encode())

    def _download(self, row):
        shard_id, path = row
        if path.endswith(".feather"):
            return self.downloader(row)
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq
        fs, folder = fsspec.core.url_to_fs(path)
        table = pq.read_table(folder, filesystem=fs).sort_by([("_turn", "ascending"), ("_mix", "ascending")])
        # Without Spark's schema note from the plan's footer: img2dataset copies it into the shard,
        # and Spark would read the shard with the plan's columns.
        table = table.select(self.downloader.column_list).replace_schema_metadata(None)
        tmp_fs, tmp = fsspec.core.url_to_fs(f"{self.tmp_dir}/{shard_id}.feather")
        with tmp_fs.open(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        status, _ = self.downloader((shard_id, f"{self.tmp_dir}/{shard_id}.feather"))  # removes it when done
        if tmp_fs.exists(tmp):
            tmp_fs.rm(tmp)
        return status, row


_NEEDS_PIL_MODES = {"I;16", "I;16B", "I;16L", "I", "F", "CMYK", "P", "PA", "LA", "RGBA", "1", "YCbCr", "LAB", "HSV"}


class SafeResizer:
    """Header check before decode, PIL normalisation of odd images, then img2dataset's Resizer. A plain
    JPEG takes net/reduced_decode.py instead, which stores the same bytes without the Resizer's per-image
    set-up, and decodes at reduced size when half its size or less still leaves 1.5x the stored side
    (unless reduced_decode is off)."""

    def __init__(self, resizer, max_pixels: int, reduced_decode: bool = False):
        self.resizer = resizer
        self.max_pixels = max_pixels
        self.reduced_decode = reduced_decode

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
            fixed = normalise(image)
        except Exception as e:
            return None, None, None, None, None, f"Image decoding error: {type(e).__name__}: {e}"
        if fixed is None and blurring_bbox_list is None and image.format == "JPEG" and image.mode in ("L", "RGB") \
                and self._direct:
            scale = reduction(width, height, self.resizer.image_size, self.resizer.resize_mode.name) \
                if self.reduced_decode else 1
            return reduced_resize(self.resizer, data, width, height, image.mode == "L", scale)
        return self.resizer(io.BytesIO(fixed or data), blurring_bbox_list)

    @functools.cached_property
    def _direct(self) -> bool:
        """Whether a plain JPEG may skip img2dataset's Resizer call, whose per-image set-up (stdout and
        stderr redirected through six dup2 calls, albumentations transforms built and validated) cost
        more than the decode at small sizes: net/reduced_decode.py does the same work, once set up."""
        from img2dataset.resizer import Resizer
        r = self.resizer
        return isinstance(r, Resizer) and not r.skip_reencode and not r.disable_all_reencoding and r.blurrer is None


def stored_form(settings) -> SafeResizer:
    """The resizer the download stage stores images with (DownloadSettings): (bytes) -> (image, width,
    height, original width, original height, error)."""
    from img2dataset.resizer import Resizer
    resizer = Resizer(image_size=settings.image_size, resize_mode=settings.resize_mode,
                      resize_only_if_bigger=settings.resize_only_if_bigger,
                      encode_quality=settings.encode_quality, encode_format=settings.encode_format,
                      min_image_size=settings.min_image_size, max_image_area=settings.max_image_pixels,
                      max_aspect_ratio=settings.max_aspect_ratio)
    return SafeResizer(resizer, settings.max_image_pixels, settings.reduced_decode)


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
