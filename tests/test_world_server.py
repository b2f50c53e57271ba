"""The loopback web server of the shapes world: every fault, clean shutdown, and `serve` in the CLI.
All traffic goes to 127.0.0.1, and never through a proxy."""

from __future__ import annotations

import email.utils
import http.client
import math
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.world.corpus import bomb_png, make_web_corpus
from capfilt.world.scene import Scene, SceneObject, encode_jpeg, render
from capfilt.world.server import WorldServer, serve, serve_hosts

REPO = Path(__file__).resolve().parents[1]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any *_proxy variables


def fetch(url: str, timeout: float = 5):
    """(status, body, headers, final url); HTTP errors are answers too."""
    try:
        with OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read(), response.headers, response.url
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers, url


@pytest.fixture
def site(tmp_path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    scene = Scene((SceneObject("red", "circle", "small"), SceneObject("blue", "square", "large")), "white")
    jpeg = encode_jpeg(render(scene))
    (img / "a.jpg").write_bytes(jpeg)
    (img / "b.jpg").write_bytes(jpeg)
    (img / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img / "bomb.png").write_bytes(bomb_png())
    return tmp_path


@pytest.fixture
def server(site):
    with serve(site) as running:
        yield running


def test_serves_files_on_loopback_with_their_content_type(server, site):
    assert server.base_url == f"http://127.0.0.1:{server.port}" and server.port > 0
    status, body, headers, _ = fetch(server.base_url + "/img/a.jpg")
    assert (status, body, headers["Content-Type"]) == (200, (site / "img/a.jpg").read_bytes(), "image/jpeg")
    assert fetch(server.base_url + "/img/bomb.png")[2]["Content-Type"] == "image/png"


def test_head_sends_headers_without_body(server, site):
    request = urllib.request.Request(server.base_url + "/img/a.jpg", method="HEAD")
    with OPENER.open(request, timeout=5) as response:
        assert response.read() == b""
        assert int(response.headers["Content-Length"]) == (site / "img/a.jpg").stat().st_size


@pytest.mark.parametrize(
    "path", ["/f/404/a.jpg", "/img/missing.jpg", "/img/../img/a.jpg", "/etc/passwd", "/f/unknown/a.jpg"])
def test_404_for_the_fault_missing_files_and_paths_outside_the_site(server, path):
    assert fetch(server.base_url + path)[0] == 404


def test_burst_answers_500_n_times_then_the_file_with_a_counter_per_path(server, site):
    statuses = [fetch(server.base_url + "/f/burst/3/a.jpg")[0] for _ in range(5)]
    assert statuses == [500, 500, 500, 200, 200]
    assert fetch(server.base_url + "/f/burst/3/b.jpg")[0] == 500  # b's counter is its own
    assert fetch(server.base_url + "/f/burst/0/b.jpg")[0] == 200


def test_slow_answers_after_the_delay(server):
    start = time.monotonic()
    status, body, _, _ = fetch(server.base_url + "/f/slow/400/a.jpg")
    assert status == 200 and body and time.monotonic() - start >= 0.4


def test_reset_sends_part_of_the_body_then_resets(server, site):
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        fetch(server.base_url + "/f/reset/a.jpg")
    # On a raw socket: a reset (RST), not a clean close (FIN) after a short body.
    received, reset = b"", False
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /f/reset/a.jpg HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            reset = True  # the reset may also discard what was still unread: either way, short
    head, _, body = received.partition(b"\r\n\r\n")
    assert reset and len(body) < (site / "img/a.jpg").stat().st_size


def test_redirect_lands_on_the_image(server, site):
    status, body, _, final_url = fetch(server.base_url + "/f/redirect/a.jpg")
    assert (status, body, final_url) == (200, (site / "img/a.jpg").read_bytes(), server.base_url + "/img/a.jpg")
    assert server.requests[-2:] == [("/f/redirect/a.jpg", 302), ("/img/a.jpg", 200)]


def test_redirect_loop_never_lands(server):
    assert fetch(server.base_url + "/f/loop/a/a.jpg")[0] == 302  # urllib gives up on the loop
    paths = [path for path, status in server.requests if status == 302]
    assert {"/f/loop/a/a.jpg", "/f/loop/b/a.jpg"} <= set(paths) and len(paths) > 2


def test_opt_out_headers(server):
    assert fetch(server.base_url + "/f/noai/a.jpg")[2]["X-Robots-Tag"] == "noai"
    assert fetch(server.base_url + "/f/noai-other/a.jpg")[2]["X-Robots-Tag"] == "otherbot: noai"
    assert fetch(server.base_url + "/img/a.jpg")[2]["X-Robots-Tag"] is None


def test_tdm_reservation_headers(server):
    assert fetch(server.base_url + "/f/tdm/a.jpg")[2]["tdm-reservation"] == "1"
    assert fetch(server.base_url + "/f/tdm0/a.jpg")[2]["tdm-reservation"] == "0"
    assert fetch(server.base_url + "/img/a.jpg")[2]["tdm-reservation"] is None


@pytest.mark.parametrize("fault, status", [("429", 429), ("503", 503)])
def test_rate_limit_faults_answer_once_with_retry_after_seconds_then_the_file(server, site, fault, status):
    got, _, headers, _ = fetch(f"{server.base_url}/f/{fault}/7/a.jpg")
    assert (got, headers["Retry-After"]) == (status, "7")
    assert fetch(f"{server.base_url}/f/{fault}/7/a.jpg")[:2] == (200, (site / "img/a.jpg").read_bytes())
    assert fetch(f"{server.base_url}/f/{fault}/7/b.jpg")[0] == status  # b's counter is its own


def test_429_date_gives_retry_after_as_an_http_date_then_the_file(server):
    before = time.time()
    status, _, headers, _ = fetch(server.base_url + "/f/429date/30/a.jpg")
    retry_at = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()  # whole seconds
    assert status == 429 and headers["Retry-After"].endswith(" GMT")
    assert before + 29 <= retry_at <= time.time() + 30
    assert fetch(server.base_url + "/f/429date/30/a.jpg")[0] == 200


def test_throttle_answers_429_with_the_seconds_left_for_one_window_then_serves(site):
    with serve(site, throttle_s=1.5) as server:
        assert fetch(server.base_url + "/robots.txt")[0] == 404  # not throttled, and opens no window
        status, _, headers, _ = fetch(server.base_url + "/img/a.jpg")
        answered = time.monotonic()
        assert (status, headers["Retry-After"]) == (429, "2")
        time.sleep(0.6)
        sent = time.monotonic()
        status, _, headers, _ = fetch(server.base_url + "/f/tdm/b.jpg")
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= math.ceil(1.5 - (sent - answered))
        (opened, _, _), (arrived, _, _) = server.timed_requests[1:]
        assert int(headers["Retry-After"]) == math.ceil(opened + 1.5 - arrived)
        time.sleep(max(0.0, opened + 1.5 - time.monotonic()))
        assert [fetch(server.base_url + path)[0] for path in ("/img/a.jpg", "/f/tdm/b.jpg", "/img/a.jpg")] == [200] * 3


def test_timed_requests_stamp_arrival_before_any_wait_in_the_order_responses_were_sent(server):
    before = time.monotonic()
    slow = threading.Thread(target=fetch, args=(server.base_url + "/f/slow/500/a.jpg",))
    slow.start()
    time.sleep(0.1)  # the slow request arrives first, and is answered last
    with OPENER.open(urllib.request.Request(server.base_url + "/img/b.jpg", method="HEAD"), timeout=5):
        pass
    slow.join(5)
    after = time.monotonic()
    (t_head, *head), (t_slow, *slow_entry) = server.timed_requests
    assert (head, slow_entry) == (["/img/b.jpg", 200], ["/f/slow/500/a.jpg", 200])
    assert before <= t_slow < t_head <= after and after - t_slow >= 0.5
    assert server.requests == [("/img/b.jpg", 200), ("/f/slow/500/a.jpg", 200)]


RULES = "User-agent: *\nDisallow: /f/\n"


@pytest.mark.parametrize("robots, status, body", [
    (None, 404, b""), (RULES, 200, RULES.encode()), (404, 404, b""), (410, 410, b""), (500, 500, b""),
    (503, 503, b""), ({"status": 200, "body": ""}, 200, b"")])
def test_robots_txt_answers_as_configured(site, robots, status, body):
    with serve(site, robots=robots) as server:
        got, got_body, headers, _ = fetch(server.base_url + "/robots.txt")
        assert (got, got_body) == (status, body)
        assert headers["Content-Type"] == ("text/plain" if status == 200 else None)
        assert fetch(server.base_url + "/r/robots.txt")[0] == (200 if status == 200 else 404)


def test_robots_txt_redirects_to_a_path_on_the_same_server_that_serves_the_body(site):
    with serve(site, robots={"location": "/r/moved/robots.txt", "body": RULES}) as server:
        status, body, _, final_url = fetch(server.base_url + "/robots.txt")
        assert (status, body, final_url) == (200, RULES.encode(), server.base_url + "/r/moved/robots.txt")
        assert server.requests == [("/robots.txt", 301), ("/r/moved/robots.txt", 200)]


def test_robots_txt_redirect_status_and_absolute_location(site):
    with serve(site, robots={"status": 302, "location": "http://127.0.0.1:1/robots.txt"}) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/robots.txt")
        response = connection.getresponse()
        assert (response.status, response.getheader("Location")) == (302, "http://127.0.0.1:1/robots.txt")
        connection.close()


@pytest.mark.parametrize("robots", [{"bogus": 1}, ["User-agent: *"]])
def test_refuses_a_robots_it_cannot_serve(site, robots):
    with pytest.raises(ValueError, match="robots"):
        WorldServer(site, robots=robots)


def test_serve_hosts_binds_distinct_loopback_addresses_with_per_host_options_and_stops_them_all(site):
    before = _world_threads()
    with serve_hosts(site, 3, per_host={1: {"robots": 500}}, robots=RULES) as servers:
        hosts = [server.base_url.split("//")[1].rsplit(":", 1)[0] for server in servers]
        assert hosts == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert [fetch(server.base_url + "/robots.txt")[0] for server in servers] == [200, 500, 200]
        assert [server.requests for server in servers] == [[("/robots.txt", status)] for status in (200, 500, 200)]
    assert _world_threads() == before
    for host, server in zip(hosts, servers):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, server.port), timeout=2)


def test_serve_hosts_stops_the_started_servers_when_one_fails_to_start(site):
    before = _world_threads()
    with pytest.raises(ValueError, match="robots"):
        with serve_hosts(site, 3, per_host={2: {"robots": ["bad"]}}):
            pass
    assert _world_threads() == before
    with pytest.raises(ValueError, match="per_host"):
        with serve_hosts(site, 2, per_host={2: {}}):
            pass


def test_bad_files_are_served_as_they_are(server, site):
    status, body, _, _ = fetch(server.base_url + "/img/half.jpg")
    assert status == 200 and len(body) < (site / "img/a.jpg").stat().st_size
    body = fetch(server.base_url + "/img/bomb.png")[1]
    assert body[12:16] == b"IHDR" and struct.unpack(">II", body[16:24]) == (40_000, 40_000) and len(body) < 10_000


def test_requests_are_logged_and_nothing_is_printed(server, capfd):
    for path in ("/img/a.jpg", "/f/404/a.jpg", "/f/burst/1/a.jpg"):
        fetch(server.base_url + path)
    assert server.requests == [("/img/a.jpg", 200), ("/f/404/a.jpg", 404), ("/f/burst/1/a.jpg", 500)]
    with pytest.raises(Exception):
        fetch(server.base_url + "/f/reset/a.jpg")
    assert capfd.readouterr() == ("", "")


def test_stop_interrupts_slow_requests_joins_every_thread_and_closes_the_port(site):
    before = set(threading.enumerate())
    server = WorldServer(site)
    slow_outcome = []

    def slow_client():
        try:
            slow_outcome.append(fetch(server.base_url + "/f/slow/10000/a.jpg")[0])
        except Exception as error:  # expected: the server drops the request when it stops
            slow_outcome.append(type(error).__name__)

    client = threading.Thread(target=slow_client)
    client.start()
    assert fetch(server.base_url + "/img/a.jpg")[0] == 200
    time.sleep(0.2)  # let the slow request reach its wait
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 3  # not the 10 s of the slow request
    client.join(5)
    assert slow_outcome and slow_outcome[0] != 200
    assert set(threading.enumerate()) == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)
    server.stop()  # a second stop is harmless


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_refuses_to_bind_anything_but_loopback(site, host):
    with pytest.raises(ValueError, match="loopback"):
        WorldServer(site, host=host)


def test_every_corpus_row_fetches_as_its_sidecar_says(tmp_path):
    make_web_corpus(tmp_path, 60, seed=4, slow_ms=100, burst=1)
    truth = pq.read_table(tmp_path / "truth.parquet").to_pylist()
    with serve(tmp_path / "site") as server:
        for row in truth:
            fault = row["fault"]
            url = row["url_path"] if not row["url_path"].startswith("/") else server.base_url + row["url_path"]
            if fault in ("malformed_url", "refused", "reset"):
                failures = (ValueError, urllib.error.URLError, ConnectionError, http.client.HTTPException)
                with pytest.raises(failures):
                    fetch(url)  # malformed: refused before any traffic; refused: to 127.0.0.1:1
                continue
            status, body, headers, _ = fetch(url)
            if fault == "http_500_burst":
                assert status == 500
                status, body, headers, _ = fetch(url)
            expected = {"http_404": 404, "redirect_loop": 302}.get(fault, 200)
            assert status == expected, (fault, url)
            if expected == 200:
                assert body == (tmp_path / "site" / row["file"]).read_bytes(), (fault, url)
            if fault in ("noai", "noai_other_agent"):
                assert headers["X-Robots-Tag"] == ("noai" if fault == "noai" else "otherbot: noai")
            if fault == "not_image":
                assert headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!doctype html")


def test_cli_serve_writes_metadata_for_its_port_and_stops_on_ctrl_c(tmp_path):
    make_web_corpus(tmp_path, 40, seed=5)
    process = subprocess.Popen([sys.executable, "-m", "capfilt.world.cli", "serve", str(tmp_path), "--format", "parquet",
                                "--format", "jsonl"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(4)]
        base_url = lines[0].split(" at ")[1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert (tmp_path / "metadata.jsonl").exists()
        urls = pq.read_table(tmp_path / "metadata.parquet", columns=["url"]).column("url").to_pylist()
        first_image = next(url for url in urls if url.startswith(base_url + "/img/"))
        assert fetch(first_image)[0] == 200
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0


def _world_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "world-server"]


def test_cli_serve_on_a_busy_port_is_one_line_and_leaves_nothing_running(tmp_path, capsys):
    from capfilt.jobs.cli import main as capfilt
    before = _world_threads()  # the session's own servers (other tests' fixtures) may be running
    make_web_corpus(tmp_path, 40, seed=5)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert capfilt(["world", "serve", str(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"capfilt world: error: port {port} is in use on 127.0.0.1: choose another "
                                       f"with --port, or --port 0 for any free one\n")
    assert _world_threads() == before
    assert not (tmp_path / "metadata.parquet").exists()


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_cli_serve_refuses_a_port_out_of_range(tmp_path, capsys, port):
    make_web_corpus(tmp_path, 40, seed=5)
    from capfilt.world import cli
    assert cli.main(["serve", str(tmp_path), "--port", port]) == 2
    assert capsys.readouterr().err == f"capfilt world: error: --port must be between 0 and 65535, not {port}\n"


def test_cli_serve_refuses_a_folder_that_is_not_a_corpus(tmp_path, capsys):
    from capfilt.world import cli
    before = _world_threads()
    (tmp_path / "site").mkdir()
    for folder in (tmp_path, tmp_path / "missing"):
        assert cli.main(["serve", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"capfilt world: error: {folder} is not a corpus") and err.count("\n") == 1, err
    assert _world_threads() == before
