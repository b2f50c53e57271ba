"""The polite crawler end to end, on several loopback hosts (127.0.0.2, 127.0.0.3, ...: each its own
server, allow-listed, with politeness asked for them), read from the servers' own request logs."""
import contextlib
import json
import re
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.download import main as download_main
from capfilt.world.server import serve_hosts
from helpers import solid
from tests.test_fetch import _answer, _canary, _server

RATE = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from capfilt.world.corpus import make_web_corpus
    root = tmp_path_factory.mktemp("polite")
    make_web_corpus(root, n=320, seed=11, fault_rate=0.0)
    names = sorted(p.name for p in (root / "site" / "img").iterdir() if p.suffix == ".jpg" and _sound(p))
    assert len(names) >= 250
    return root, names


def _sound(path) -> bool:
    """An image every download keeps (the corpus also has empty, truncated and tiny files)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            return min(image.size) >= 8
    except Exception:
        return False


def _download(tmp_path, servers, rows, *settings, retry=False):
    """rows: (host index, path) -> OUT with the stage's data and rejects as {uid: ...} (`retry`: the same
    run with --retry-failed on the committed OUT)."""
    meta = tmp_path / "meta.parquet"
    urls = [servers[h].base_url + path for h, path in rows]
    ids = [f"r{i:04d}" for i in range(len(rows))]
    # An input column named like one of the shard plan's rides along as input__turn, untouched.
    pq.write_table(pa.table({"id": ids, "url": urls, "caption": ["a shape"] * len(rows), "_turn": ids}), meta)
    out = tmp_path / "out"
    args = ["--input", str(meta), "--output", str(out), "--id-col", "id", "--no-progress",
            "--set", "download.loopback_only=true", "--set", "download.polite_to_allowed_hosts=true",
            "--set", "download.image_size=32", "--set", "download.min_image_size=8"]
    for server in servers:
        args += ["--allow-host", server.base_url.split("//")[1]]
    for setting in settings:
        args += ["--set", setting]
    assert download_main(args + (["--retry-failed"] if retry else [])) == 0
    table = pq.read_table(out / "data")
    records = table.select(["uid", "input__turn"]).to_pylist() if table.num_rows else []
    assert all(r["input__turn"] == r["uid"] for r in records)
    data = {r["uid"] for r in records}
    rejects = {r["uid"]: r for r in pq.read_table(out / "rejects").to_pylist()}
    assert len(data) + len(rejects) == len(rows), "every row ends in data or rejects"
    return out, data, rejects


def _most_in_one_second(times):
    return max((sum(1 for t in times if s <= t < s + 1) for s in times), default=0)


@pytest.mark.slow
def test_per_host_rate_retry_after_and_the_failure_map(site, tmp_path, capsys):
    root, names = site
    # Host 0 fills most of a shard; host 1 straddles the cut between the two shards (two tasks share
    # its budget); host 2 always fails; host 3 rate-limits (429, Retry-After: 2); host 4 is slow.
    plan = [(0, 110), (1, 50), (2, 30), (3, 30), (4, 30)]
    rows, it = [], iter(names)
    for host, n in plan:
        for k in range(n):
            name = next(it)
            path = {2: f"/f/404/{name}", 4: f"/f/slow/{1500 if k % 3 == 0 else 0}/{name}"}.get(host, f"/img/{name}")
            rows.append((host, path))
    with serve_hosts(root / "site", 5, per_host={3: {"throttle_s": 2}}) as servers:
        out, data, rejects = _download(
            tmp_path, servers, rows, f"download.max_requests_per_second_per_host={RATE}", "download.retries=2",
            "download.retry_backoff_s=0.2", "download.timeout=1", "download.threads=16")
        logs = [server.timed_requests for server in servers]
    for i, log in enumerate(logs):
        images = [t for t, path, _ in log if path != "/robots.txt"]
        assert _most_in_one_second(images) <= RATE + 1, f"host {i}: over {RATE} + 1 requests in one second"
        assert sum(path == "/robots.txt" for _, path, _ in log) == 1, f"host {i}: one robots.txt request per run"
    uid = {f"r{i:04d}": host for i, (host, _) in enumerate(rows)}
    assert all(uid[u] != 2 for u in data) and sum(uid[u] == 2 for u in rejects) == 30
    assert {rejects[u]["detail"].split(":")[0] for u in rejects if uid[u] == 2} == {"http_404"}
    # The rate-limited host: nothing arrives for 2 s after its first 429, then every row downloads.
    throttled = [(t, status) for t, path, status in logs[3] if path != "/robots.txt"]
    first_429 = min(t for t, status in throttled if status == 429)
    assert not [t for t, _ in throttled if first_429 + 0.3 < t < first_429 + 1.9]
    assert sum(uid[u] == 3 for u in data) == 30, [rejects[u]["detail"] for u in rejects if uid[u] == 3]
    slow_failed = [u for u in rejects if uid[u] == 4]
    assert len(slow_failed) == 10 and {rejects[u]["detail"].split(":")[0] for u in slow_failed} == {"timeout"}

    from capfilt.jobs.report import main as inspect_main
    capsys.readouterr()
    assert inspect_main([str(out)]) == 0
    text = capsys.readouterr().out
    hosts = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("127.0.0.")}
    failing, slow = servers[2].base_url.split("//")[1], servers[4].base_url.split("//")[1]
    assert hosts[failing][1:4] == ["30", "30", "0.0%"] and hosts[failing][-1] == "http_404"
    assert hosts[slow][1:4] == ["30", "10", "66.7%"] and hosts[slow][-1] == "timeout"
    assert list(hosts)[0] == failing, "most failures first"


ROBOTS_CAPFILT = "User-agent: *\nDisallow: /\n\nUser-agent: capfilt\nAllow: /img/\nDisallow: /f/\n"
ROBOTS_IMG2DATASET = "User-agent: img2dataset\nDisallow: /img/\n"


@pytest.mark.slow
def test_robots_txt_one_request_per_host_and_disallowed_rows_never_fetched(site, tmp_path):
    root, names = site
    per_host = {0: {"robots": ROBOTS_CAPFILT}, 1: {"robots": 500}, 2: {"robots": 404},
                3: {"robots": ROBOTS_IMG2DATASET}}
    rows = ([(0, f"/img/{n}") for n in names[:10]] + [(0, f"/f/redirect/{n}") for n in names[10:20]]
            + [(h, f"/img/{n}") for h, chunk in ((1, names[20:35]), (2, names[35:50]), (3, names[50:55]))
               for n in chunk])
    with serve_hosts(root / "site", 4, per_host=per_host) as servers:
        _, data, rejects = _download(tmp_path, servers, rows, "download.max_requests_per_second_per_host=0",
                                     "download.max_connections_per_host=0")
        logs = [server.requests for server in servers]
    for i, log in enumerate(logs):
        assert sum(path == "/robots.txt" for path, _ in log) == 1, f"host {i}"
    host_of = {f"r{i:04d}": h for i, (h, _) in enumerate(rows)}
    refused = {u for u, r in rejects.items() if r["reason"] == "opted_out" and r["detail"].startswith("robots_txt: ")}
    by_host = {h: {u for u in refused if host_of[u] == h} for h in range(4)}
    assert len(by_host[0]) == 10 and all(rows[int(u[1:])][1].startswith("/f/") for u in by_host[0])
    unreachable = {u for u, r in rejects.items() if r["reason"] == "failed_to_download"
                   and r["detail"].startswith("robots_txt_unreachable: ")}
    assert {host_of[u] for u in unreachable} == {1} and len(unreachable) == 15, \
        "robots.txt answering 500: the host is disallowed for the run (retryable)"
    assert not by_host[2] and sum(host_of[u] == 2 for u in data) == 15, "robots.txt answering 404: all allowed"
    assert len(by_host[3]) == 5, "a group naming img2dataset is honoured too"
    assert [p for p, _ in logs[0] if p.startswith("/f/")] == [], "disallowed rows are never requested"
    assert [p for p, _ in logs[1] if p != "/robots.txt"] == [] and [p for p, _ in logs[3] if p != "/robots.txt"] == []
    assert sum(host_of[u] == 0 for u in data) == 10


def test_progress_lines_come_from_the_shards_stats(tmp_path, capsys):
    import json
    import time

    from capfilt.pipelines.download import Progress
    progress = Progress(str(tmp_path), shards=3, every=0.05)
    time.sleep(0.12)
    for shard, (count, ok) in enumerate(((100, 90), (50, 50))):
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count, "successes": ok}))
    progress.stop()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("download: no shard finished yet")
    assert lines[-1].startswith("download: 2 of 3 shards done, 150 rows (93.3% downloaded), ")


# --- issue 32: robots.txt verdicts lost, Retry-After that stalled a run -------------------------------

@contextlib.contextmanager
def _raw_site(robots=("404 Not Found", [], b""), images=None):
    """A loopback host (tests/test_fetch.py's raw server, 127.0.0.1): /robots.txt answers `robots`
    (status, headers, body; or a function returning them), every other path `images` (the same; None:
    a small JPEG). Yields an object with base_url and log: the (path, status) of every request, in order."""
    jpeg = solid((200, 30, 30), 16)
    site = types.SimpleNamespace(log=[])

    def respond(path, conn, stop):
        answer = robots if path == "/robots.txt" else images
        answer = answer() if callable(answer) else answer
        status, headers, body = answer or ("200 OK", [("Content-Type", "image/jpeg")], jpeg)
        site.log.append((path, int(status.split()[0])))
        _answer(status, [*headers, ("Content-Length", len(body))], body)(path, conn, stop)
    with _server(respond) as port:
        site.base_url = f"http://127.0.0.1:{port}"
        yield site


ROBOTS_PRIVATE = "User-agent: *\r\nDisallow: /private/\r\n"
NO_LIMITS = ("download.max_requests_per_second_per_host=0", "download.max_connections_per_host=0")


@pytest.mark.slow
def test_robots_txt_rules_hold_whatever_its_encoding_headers_or_size(tmp_path):
    """Each host's robots.txt disallows /private/: with a BOM (its Disallow was ignored), as UTF-16, with
    X-Robots-Tag: noindex or tdm-reservation: 1 on the file (it was 'no verdict'), larger than max_bytes
    and 500 KiB, or moved behind an address capfilt may not fetch. The servers' own logs: no request to
    /private/ anywhere, the other images downloaded."""
    big = (ROBOTS_PRIVATE + "# padding\n" * 60_000).encode()
    variants = {
        "bom": ("200 OK", [], b"\xef\xbb\xbf" + ROBOTS_PRIVATE.encode()),
        "utf16": ("200 OK", [("Content-Type", "text/plain; charset=utf-16")], ROBOTS_PRIVATE.encode("utf-16")),
        "noindex": ("200 OK", [("X-Robots-Tag", "noindex, noai")], ROBOTS_PRIVATE.encode()),
        "tdm": ("200 OK", [("tdm-reservation", "1")], ROBOTS_PRIVATE.encode()),
        "big": ("200 OK", [], big),
    }
    with contextlib.ExitStack() as stack:
        canary, connections = stack.enter_context(_canary())
        variants["redirected"] = ("302 Found", [("Location", f"http://127.0.0.1:{canary}/robots.txt")], b"")
        sites = {name: stack.enter_context(_raw_site(answer)) for name, answer in variants.items()}
        servers = list(sites.values())
        rows = [(h, f"/{where}/{k}.jpg") for h in range(len(servers)) for where in ("img", "private") for k in range(2)]
        _, data, rejects = _download(tmp_path, servers, rows, *NO_LIMITS, "download.max_bytes=100000")
        assert connections() == 0, "nothing connected to the address robots.txt was moved to"
    for name, site in sites.items():
        assert [p for p, _ in site.log if p.startswith("/private/")] == [], f"{name}: a disallowed path was requested"
        assert sum(p == "/robots.txt" for p, _ in site.log) == 1, name
    code = {u: r["detail"].split(":")[0] for u, r in rejects.items()}
    for i, (h, path) in enumerate(rows):
        uid, name = f"r{i:04d}", list(sites)[h]
        if name == "redirected":
            assert rejects[uid]["reason"] == "opted_out" and code[uid] == "robots_txt", rejects[uid]
        elif path.startswith("/private/"):
            assert rejects[uid]["reason"] == "opted_out" and code[uid] == "robots_txt", (name, rejects.get(uid))
        else:
            assert uid in data, (name, rejects.get(uid))
    assert [p for p, _ in sites["redirected"].log] == ["/robots.txt"], "no image of a host whose rules are unread"


@pytest.mark.slow
def test_an_unreachable_robots_txt_leaves_the_rows_to_retry_failed_which_asks_it_again(tmp_path):
    """RFC 9309: robots.txt answering 5xx (or unreachable) disallows the host for the run. Its rows were
    opted_out, which --retry-failed never retries; they are failed_to_download (robots_txt_unreachable),
    and the retry asks robots.txt again before any image: what the new file disallows is never fetched."""
    answer = {"robots": ("503 Service Unavailable", [], b"")}
    with _raw_site(lambda: answer["robots"]) as site:
        rows = [(0, f"/img/{k}.jpg") for k in range(3)] + [(0, f"/private/{k}.jpg") for k in range(2)]
        out, data, rejects = _download(tmp_path, [site], rows, *NO_LIMITS)
        assert not data and [p for p, _ in site.log] == ["/robots.txt"]
        assert {(r["reason"], r["detail"].split(":")[0]) for r in rejects.values()} == \
            {("failed_to_download", "robots_txt_unreachable")}
        answer["robots"] = ("200 OK", [], ROBOTS_PRIVATE.encode())
        _, data, rejects = _download(tmp_path, [site], rows, *NO_LIMITS, retry=True)
        log = [p for p, _ in site.log]
    assert log[:2] == ["/robots.txt", "/robots.txt"], "the retry asked robots.txt again, before any image"
    assert sorted(log[2:]) == [f"/img/{k}.jpg" for k in range(3)], "no request to a disallowed path"
    assert data == {"r0000", "r0001", "r0002"}
    assert {u: (r["reason"], r["detail"].split(":")[0]) for u, r in rejects.items()} == \
        {"r0003": ("opted_out", "robots_txt"), "r0004": ("opted_out", "robots_txt")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retries"][-1] == {"retried": 5, "recovered": 3}


@pytest.mark.slow
def test_a_host_answering_retry_after_forever_is_given_up_after_three_answers(site, tmp_path):
    """429 with Retry-After: 15 forever held a shard 15 s per row (24 rows: 165 s; 119 s would stall a run
    for hours). With one connection the host is asked three times, each after the last wait, and its
    other rows fail at once with retryable codes; the other host is served meanwhile."""
    root, names = site
    answer = {"images": ("429 Too Many Requests", [("Retry-After", "1")], b"")}
    settings = ("download.max_requests_per_second_per_host=0", "download.max_connections_per_host=1",
                "download.processes=1", "download.threads=4")  # max_retry_after_answers: 3, the default
    with _raw_site(images=lambda: answer.get("images")) as throttled, serve_hosts(root / "site", 1) as (healthy,):
        rows = [(0, f"/img/{k}.jpg") for k in range(24)] + [(1, f"/img/{n}") for n in names[:6]]
        started = time.monotonic()
        out, data, rejects = _download(tmp_path, [throttled, healthy], rows, *settings)
        took = time.monotonic() - started
        fetch_s = json.loads((out / "manifest.json").read_text())["timings"]["fetch"]
        log = list(throttled.log)
        del answer["images"]  # the host serves again: --retry-failed (same workers, a new run) fetches every row
        _, retried, left = _download(tmp_path, [throttled, healthy], rows, *settings, retry=True)
    assert len(retried) == 30 and not left, {u: r["detail"] for u, r in left.items()}
    images = [status for path, status in log if path != "/robots.txt"]
    assert images == [429, 429, 429], f"{len(images)} image requests to the throttled host"
    assert data == {f"r{i:04d}" for i in range(24, 30)}, "the healthy host's rows downloaded"
    codes = [re.match(r"([a-z0-9_]+): ", rejects[f"r{i:04d}"]["detail"]).group(1) for i in range(24)]
    assert sorted(set(codes)) == ["http_429", "retry_after"] and codes.count("http_429") == 3, codes
    assert {rejects[f"r{i:04d}"]["reason"] for i in range(24)} == {"failed_to_download"}, "retried by --retry-failed"
    assert fetch_s < 12, f"fetch took {fetch_s} s ({took:.0f} s in all): two waits of 1 s, then nothing"
