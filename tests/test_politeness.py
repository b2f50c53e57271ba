"""The polite crawler end to end, on several loopback hosts (127.0.0.2, 127.0.0.3, ...: each its own
server, allow-listed, with politeness asked for them), read from the servers' own request logs."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.jobs.download import main as download_main
from capfilt.world.server import serve_hosts

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


def _download(tmp_path, servers, rows, *settings):
    """rows: (host index, path) -> OUT with the stage's data and rejects as {uid: ...}."""
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
    assert download_main(args) == 0
    records = pq.read_table(out / "data", columns=["uid", "input__turn"]).to_pylist()
    assert all(r["input__turn"] == r["uid"] for r in records)
    data = {r["uid"] for r in records}
    rejects = {r["uid"]: r for r in pq.read_table(out / "rejects").to_pylist()}
    assert len(data) + len(rejects) == len(rows), "every row ends in data or rejects"
    return out, data, rejects


def _most_in_one_second(times):
    return max((sum(1 for t in times if s <= t < s + 1) for s in times), default=0)


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
    assert len(by_host[1]) == 15, "robots.txt answering 500: the host is disallowed for the run"
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
