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
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import struct
import threading
import time
from contextlib import contextmanager
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
]


class _Handler(BaseHTTPRequestHandler):
    server: _FaultyServer
    timeout = 10  # a client that connects and sends nothing cannot hold up shutdown for long

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def log_message(self, format: str, *args) -> None:  # quiet: the request log replaces stderr
        pass

    def log_request(self, code="-", size="-") -> None:
        self.server.log_request_status(self.path, int(code))

    def _respond(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        for fault, pattern in ROUTES:
            match = pattern.match(path)
            if match:
                break
        else:
            return self._status(404)
        params = match.groupdict()
        file = self.server.site_dir / "img" / params["name"]
        if fault == "404":
            return self._status(404)
        if fault == "redirect":
            return self._redirect(f"/img/{params['name']}")
        if fault == "loop":
            return self._redirect(f"/f/loop/{'b' if params['side'] == 'a' else 'a'}/{params['name']}")
        if not file.is_file():
            return self._status(404)
        if fault == "burst" and self.server.count_request(path) <= int(params["count"]):
            return self._status(500)
        if fault == "slow" and self.server.stopping.wait(min(int(params["ms"]), MAX_SLOW_MS) / 1000):
            return self._abort()  # the server is stopping: do not hold up shutdown
        body = file.read_bytes()
        headers = {"Content-Type": CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream"),
                   "Content-Length": str(len(body))}
        if fault == "noai":
            headers["X-Robots-Tag"] = "noai"
        elif fault == "noai-other":
            headers["X-Robots-Tag"] = "otherbot: noai"
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            return self._abort()
        if send_body:
            self.wfile.write(body)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _redirect(self, target: str) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.base_url + target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _abort(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP reset (RST) instead of a FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


class _FaultyServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread: nothing is left running

    def __init__(self, site_dir: Path, address: tuple[str, int]):
        super().__init__(address, _Handler)
        self.site_dir = site_dir
        self.base_url = f"http://{address[0]}:{self.server_address[1]}"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.request_log: list[tuple[str, int]] = []

    def count_request(self, path: str) -> int:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]

    def log_request_status(self, path: str, status: int) -> None:
        with self._lock:
            self.request_log.append((path, status))

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-response (the reset fault, timeouts) are normal here


class PortUnavailable(OSError):
    """The port is taken, or not ours to bind; str() is the message alone."""

    def __str__(self) -> str:
        return self.strerror


class WorldServer:
    """A running server: base_url, port, requests (a snapshot of (path, status)), stop()."""

    def __init__(self, site_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                 allow_non_loopback: bool = False):
        if not allow_non_loopback and not _is_loopback(host):
            raise ValueError(f"refusing to bind {host!r}: the world server binds loopback only "
                             "unless allow_non_loopback=True")
        site_dir = Path(site_dir)
        if not (site_dir / "img").is_dir():
            raise FileNotFoundError(f"{site_dir}/img does not exist: generate a corpus first")
        try:
            self._server = _FaultyServer(site_dir, (host, port))  # closes its socket if bind fails
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
    def requests(self) -> list[tuple[str, int]]:
        with self._server._lock:
            return list(self._server.request_log)

    def stop(self) -> None:
        """Stop serving, wake slow handlers, and join every thread. Safe to call twice."""
        if not self._thread.is_alive():
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def serve(site_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
          allow_non_loopback: bool = False) -> Iterator[WorldServer]:
    """Serve site_dir on host:port (0: an ephemeral port) for the duration of a with-block."""
    server = WorldServer(site_dir, host, port, allow_non_loopback)
    try:
        yield server
    finally:
        server.stop()


def serve_until_interrupted(site_dir: str | Path, port: int = 0,
                            on_start: Callable[[WorldServer], None] | None = None) -> None:
    """Blocking mode (for the CLI): serve on 127.0.0.1, call on_start(server), then wait for Ctrl-C."""
    with serve(site_dir, port=port) as server:
        if on_start is not None:
            on_start(server)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
