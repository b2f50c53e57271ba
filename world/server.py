"""A loopback HTTP server for the web corpus, producing each fault by URL path.

Files live in site_dir/img and are served at /img/<name>. Faults that a server causes (as opposed
to bad files, which are just files) are asked for by path; <name> is always a file in site_dir/img:

    /f/404/<name>             404 Not Found
    /f/burst/<n>/<name>       500 for the first n requests to this path, then the file (retryable)
    /f/slow/<ms>/<name>       the file after ms milliseconds (capped at 10 s)
    /f/reset/<name>           headers and half the body, then a TCP reset
    /f/redirect/<name>        302 to /img/<name>
    /f/loop/a|b/<name>        302 from a to b and back, forever
    /f/noai/<name>            the file with "X-Robots-Tag: noai"
    /f/noai-other/<name>      the file with "X-Robots-Tag: otherbot: noai" (not addressed to us)
    /f/429/<s>/<name>         429 with "Retry-After: <s>" for the first request to this path, then the file
    /f/429date/<s>/<name>     the same, with Retry-After as the HTTP-date s seconds from now
    /f/503/<s>/<name>         503 with "Retry-After: <s>" for the first request to this path, then the file
    /f/tdm/<name>             the file with "tdm-reservation: 1" (TDMRep: text and data mining reserved)
    /f/tdm0/<name>            the file with "tdm-reservation: 0"

Server-wide behaviour, chosen when the server starts:

    /robots.txt               robots=None: 404; a str: 200 text/plain with that body; an int: that
                              status, empty body; a dict {"status", "body", "location"} (each optional):
                              that status (default 301 with a location, else 200), body and Location
                              (a path on this server, or an absolute URL)
    /r/<...>robots.txt        200 with robots' body (404 if it has none): a target for redirects
    throttle_s > 0            a rate-limited host: the first request to an /img/ or /f/ path opens a
                              window of throttle_s seconds in which every such request answers 429 with
                              Retry-After the seconds left, rounded up; then all is served (once per server)
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import math
import re
import socket
import struct
import threading
import time
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

MAX_SLOW_MS = 10_000
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif"}
_NAME = r"(?P<name>[\w-][\w.-]*)"  # one path segment that cannot be ".." or hidden
ROUTES = [
    ("static", re.compile(rf"^/img/{_NAME}$")),
    ("404", re.compile(rf"^/f/404/{_NAME}$")),
    ("burst", re.compile(rf"^/f/burst/(?P<count>\d+)/{_NAME}$")),
    ("slow", re.compile(rf"^/f/slow/(?P<ms>\d+)/{_NAME}$")),
    ("reset", re.compile(rf"^/f/reset/{_NAME}$")),
    ("redirect", re.compile(rf"^/f/redirect/{_NAME}$")),
    ("loop", re.compile(rf"^/f/loop/(?P<side>[ab])/{_NAME}$")),
    ("noai", re.compile(rf"^/f/noai/{_NAME}$")),
    ("noai-other", re.compile(rf"^/f/noai-other/{_NAME}$")),
    ("429", re.compile(rf"^/f/429/(?P<secs>\d+)/{_NAME}$")),
    ("429date", re.compile(rf"^/f/429date/(?P<secs>\d+)/{_NAME}$")),
    ("503", re.compile(rf"^/f/503/(?P<secs>\d+)/{_NAME}$")),
    ("tdm", re.compile(rf"^/f/tdm/{_NAME}$")),
    ("tdm0", re.compile(rf"^/f/tdm0/{_NAME}$")),
]
FAULT_HEADERS = {
    "noai": {"X-Robots-Tag": "noai"},
    "noai-other": {"X-Robots-Tag": "otherbot: noai"},
    "tdm": {"tdm-reservation": "1"},
    "tdm0": {"tdm-reservation": "0"},
}
Robots = str | int | dict | None
FIRST_EXTRA_HOST = ipaddress.ip_address("127.0.0.2")  # serve_hosts' first address; Linux routes all of 127/8 to lo


class _Handler(BaseHTTPRequestHandler):
    server: _FaultyServer
    timeout = 10  # a client that connects and sends nothing cannot hold up shutdown for long

    def parse_request(self) -> bool:
        self.arrived = time.monotonic()  # called as soon as the request line has been read
        return super().parse_request()

    def do_GET(self) -> None:
        self._respond()

    def do_HEAD(self) -> None:
        self._respond()

    def log_message(self, format: str, *args) -> None:  # quiet: the request log replaces stderr
        pass

    def log_request(self, code="-", size="-") -> None:
        self.server.log_request_status(self.arrived, self.path, int(code))

    def _respond(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/robots.txt" or (path.startswith("/r/") and path.endswith("robots.txt")):
            return self._robots(path)
        if path.startswith(("/img/", "/f/")):
            wait = self.server.throttle_left(self.arrived)
            if wait > 0:
                return self._reply(429, {"Retry-After": str(math.ceil(wait))})
        for fault, pattern in ROUTES:
            match = pattern.match(path)
            if match:
                break
        else:
            return self._reply(404)
        params = match.groupdict()
        file = self.server.site_dir / "img" / params["name"]
        if fault == "404":
            return self._reply(404)
        if fault == "redirect":
            return self._reply(302, {"Location": self.server.base_url + f"/img/{params['name']}"})
        if fault == "loop":
            other = f"/f/loop/{'b' if params['side'] == 'a' else 'a'}/{params['name']}"
            return self._reply(302, {"Location": self.server.base_url + other})
        if not file.is_file():
            return self._reply(404)
        if fault == "burst" and self.server.count_request(path) <= int(params["count"]):
            return self._reply(500)
        if fault in ("429", "429date", "503") and self.server.count_request(path) == 1:
            secs = int(params["secs"])
            retry_after = email.utils.formatdate(time.time() + secs, usegmt=True) if fault == "429date" else str(secs)
            return self._reply(503 if fault == "503" else 429, {"Retry-After": retry_after})
        if fault == "slow" and self.server.stopping.wait(min(int(params["ms"]), MAX_SLOW_MS) / 1000):
            return self._abort()  # the server is stopping: do not hold up shutdown
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        for key, value in FAULT_HEADERS.get(fault, {}).items():
            self.send_header(key, value)
        self.end_headers()
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            return self._abort()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _robots(self, path: str) -> None:
        rule = self.server.robots
        if rule is None or (path != "/robots.txt" and rule[1] is None):
            return self._reply(404)
        status, body, location = rule if path == "/robots.txt" else (200, rule[1], None)
        headers = {} if body is None else {"Content-Type": "text/plain"}
        if location is not None:
            headers["Location"] = self.server.base_url + location if location.startswith("/") else location
        self._reply(status, headers, (body or "").encode())

    def _reply(self, code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        """Send code, headers and body (no body for HEAD)."""
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _abort(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP reset (RST) instead of a FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


class _KeepAliveHandler(_Handler):
    """HTTP/1.1: the connection stays open for the next request until the client closes it (or asks to)."""
    protocol_version = "HTTP/1.1"


class _FaultyServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread: nothing is left running

    def __init__(self, site_dir: Path, address: tuple[str, int],
                 robots: tuple[int, str | None, str | None] | None, throttle_s: float, tls=None,
                 keep_alive: bool = False):
        super().__init__(address, _KeepAliveHandler if keep_alive else _Handler)
        self.open_connections: set = set()  # shut down on stop: an idle kept-alive one would hold it up
        self.connections = 0  # accepted so far
        self.site_dir = site_dir
        self.tls = tls  # an ssl.SSLContext: HTTPS
        self.base_url = f"{'https' if tls else 'http'}://{address[0]}:{self.server_address[1]}"
        self.robots = robots
        self.throttle_s = throttle_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._throttle_start: float | None = None
        self.request_log: list[tuple[float, str, int]] = []

    def count_request(self, path: str) -> int:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]

    def throttle_left(self, now: float) -> float:
        """Seconds of the throttle window left at now (0: serve); the first call opens the window."""
        if self.throttle_s <= 0:
            return 0.0
        with self._lock:
            if self._throttle_start is None:
                self._throttle_start = now
            return max(0.0, self._throttle_start + self.throttle_s - now)

    def log_request_status(self, arrived: float, path: str, status: int) -> None:
        with self._lock:
            self.request_log.append((arrived, path, status))

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-response (the reset fault, timeouts) are normal here

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is not None:
            # The handshake runs in the handler's thread (on its first read), not in the accepting loop,
            # so a client that never finishes one holds only its own thread.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            self.connections += 1
            self.open_connections.add(sock)
        return sock, address

    def shutdown_request(self, request) -> None:
        with self._lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def hang_up_all(self) -> None:
        """Wake every handler blocked reading its next request (kept-alive connections)."""
        with self._lock:
            conns = list(self.open_connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PortUnavailable(OSError):
    """The port is taken, or not ours to bind; str() is the message alone."""

    def __str__(self) -> str:
        return self.strerror


class WorldServer:
    """A running server: base_url, port, requests (a snapshot of (path, status)), timed_requests, stop().

    robots and throttle_s are the server-wide behaviours of the module docstring; tls, a folder
    world/tls.py's make_certificates wrote, serves HTTPS with its certificate; keep_alive answers in
    HTTP/1.1 and keeps each connection open for the client's next request (default: HTTP/1.0, one request
    per connection)."""

    def __init__(self, site_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                 allow_non_loopback: bool = False, *, robots: Robots = None, throttle_s: float = 0,
                 tls: str | Path | None = None, keep_alive: bool = False):
        if not allow_non_loopback and not _is_loopback(host):
            raise ValueError(f"refusing to bind {host!r}: the world server binds loopback only "
                             "unless allow_non_loopback=True")
        site_dir = Path(site_dir)
        if not (site_dir / "img").is_dir():
            raise FileNotFoundError(f"{site_dir}/img does not exist: generate a corpus first")
        rule = _robots_rule(robots)
        context = None
        if tls is not None:
            from capfilt.world.tls import server_context
            context = server_context(tls)
        try:  # closes its socket if bind fails
            self._server = _FaultyServer(site_dir, (host, port), rule, throttle_s, context, keep_alive)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortUnavailable(e.errno, f"port {port} is in use on {host}") from None
            raise PortUnavailable(e.errno, f"port {port} cannot be bound on {host} ({e.strerror})") from None
        self.base_url = self._server.base_url
        self.port = self._server.server_address[1]
        # A short poll interval makes stop() quick: shutdown() waits for the loop's next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="world-server", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self._server.connections

    @property
    def requests(self) -> list[tuple[str, int]]:
        with self._server._lock:
            return [(path, status) for _, path, status in self._server.request_log]

    @property
    def timed_requests(self) -> list[tuple[float, str, int]]:
        """(t, path, status) in the order responses were sent; t: time.monotonic() as the request arrived."""
        with self._server._lock:
            return list(self._server.request_log)

    def stop(self) -> None:
        """Stop serving, wake slow handlers, and join every thread. Safe to call twice."""
        if not self._thread.is_alive():
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.hang_up_all()
        self._server.server_close()
        self._thread.join()


def _robots_rule(robots: Robots) -> tuple[int, str | None, str | None] | None:
    """robots as (status, body, location) for /robots.txt; None: there is none."""
    if robots is None:
        return None
    if isinstance(robots, str):
        return 200, robots, None
    if isinstance(robots, int):
        return robots, None, None
    if isinstance(robots, dict) and set(robots) <= {"status", "body", "location"}:
        location = robots.get("location")
        return robots.get("status", 200 if location is None else 301), robots.get("body"), location
    raise ValueError(f"robots must be None, a str, an int or a dict of status, body and location, not {robots!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def serve(site_dir: str | Path, host: str = "127.0.0.1", port: int = 0, allow_non_loopback: bool = False, *,
          robots: Robots = None, throttle_s: float = 0, tls: str | Path | None = None,
          keep_alive: bool = False) -> Iterator[WorldServer]:
    """Serve site_dir on host:port (0: an ephemeral port) for the duration of a with-block."""
    server = WorldServer(site_dir, host, port, allow_non_loopback, robots=robots, throttle_s=throttle_s, tls=tls,
                         keep_alive=keep_alive)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serve_hosts(site_dir: str | Path, n: int, per_host: dict[int, dict] | None = None,
                **kwargs) -> Iterator[list[WorldServer]]:
    """n servers of site_dir, the i-th on 127.0.0.(i+2) at an ephemeral port, for a with-block.

    kwargs (robots, throttle_s, tls, keep_alive) go to every server; per_host[i] overrides them for the i-th, e.g.
    per_host={0: {"robots": 500}}. All are stopped on exit, and if any fails to start."""
    per_host = per_host or {}
    if not set(per_host) <= set(range(n)):
        raise ValueError(f"per_host keys must be indexes below n={n}, not {sorted(per_host)}")
    with ExitStack() as stack:
        yield [stack.enter_context(serve(site_dir, str(FIRST_EXTRA_HOST + i), **{**kwargs, **per_host.get(i, {})}))
               for i in range(n)]


def serve_until_interrupted(site_dir: str | Path, port: int = 0,
                            on_start: Callable[[WorldServer], None] | None = None,
                            tls: str | Path | None = None, keep_alive: bool = False) -> None:
    """Blocking mode (for the CLI): serve on 127.0.0.1, call on_start(server), then wait for Ctrl-C."""
    with serve(site_dir, port=port, tls=tls, keep_alive=keep_alive) as server:
        if on_start is not None:
            on_start(server)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
