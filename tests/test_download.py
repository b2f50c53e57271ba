"""The download stage against the shapes world's loopback server: every fault under its reason,
counts that add up, retry of retryable failures, resume after a kill, opt-out and SSRF probes.
Every run uses download.loopback_only, so a broken address policy fails a test instead of sending
a packet outside 127.0.0.0/8."""
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections import Counter

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.jobs.download import main as download_main
from capfilt.pipelines.output import read_manifest
from capfilt.schemas import DOWNLOADED, REJECTS
from tests.conftest import ROOT

SETTINGS = ["--set", "download.image_size=64", "--set", "download.timeout=4", "--set", "download.threads=8",
            "--set", "download.loopback_only=true", "--no-progress"]

EXPECTED = {  # world fault -> the reason its row must end with (None: downloaded)
    "http_404": "failed_to_download", "http_500_burst": "failed_to_download", "refused": "failed_to_download",
    "reset": "failed_to_download", "redirect_loop": "failed_to_download", "slow": None, "redirect": None,
    "not_image": "failed_to_decode", "truncated": "failed_to_decode", "empty_body": "failed_to_decode",
    "tiny": "too_small", "bomb": "too_large", "noai": "opted_out", "noai_other_agent": None,
    "malformed_url": "invalid_url", "empty_caption": "empty_caption", "long_caption": None,
    "invalid_utf8_caption": None, "duplicate_id": "duplicate_uid",
}


def truth(root):
    return pq.read_table(root / "truth.parquet", columns=["id", "url_path", "kind", "fault", "variant"]).to_pandas()


def outcome(out):
    data = ds.dataset(out / "data").to_table(columns=["uid", "url"]).to_pandas().assign(reason=None)
    rejects = ds.dataset(out / "rejects").to_table().to_pandas()
    return data, rejects


@pytest.fixture(scope="module")
def downloaded(world_site, tmp_path_factory):
    root, server, metadata = world_site
    out = tmp_path_factory.mktemp("dl") / "download"
    # 127.0.0.1:1 is the corpus's "refused" endpoint: allowed here so it is refused, not blocked.
    code = download_main(["--input", str(metadata), "--id-col", "id", "--output", str(out),
                          "--allow-host", f"127.0.0.1:{server.port}", "--allow-host", "127.0.0.1:1", *SETTINGS])
    assert code in (0, None)
    return root, server, out


@pytest.mark.slow
def test_every_input_row_ends_in_exactly_one_place(downloaded):
    root, _, out = downloaded
    data, rejects = outcome(out)
    n_input = pq.read_metadata(root / "metadata.parquet").num_rows
    assert len(data) + len(rejects) == n_input
    assert not set(data.uid) & set(rejects.uid[rejects.reason != "duplicate_uid"])
    counts = read_manifest(out)["counts"]
    assert counts["input"] == n_input and counts["output"] == len(data)
    assert counts["rejected"]["download"] == dict(Counter(rejects.reason))
    DOWNLOADED.validate(ds.dataset(out / "data").schema)
    REJECTS.validate(ds.dataset(out / "rejects").schema)


@pytest.mark.slow
def test_each_fault_ends_under_its_reason(downloaded):
    root, _, out = downloaded
    data, rejects = outcome(out)
    t = truth(root)
    faults = t[t.fault.notna() & (t.fault != "duplicate_id")]
    by_uid = pd.concat([data[["uid", "reason"]], rejects[["uid", "reason"]]]).drop_duplicates("uid").set_index("uid")
    got = {f: by_uid.reason.get(uid) for f, uid in zip(faults.fault, faults.id)}
    assert got == {f: r for f, r in EXPECTED.items() if f != "duplicate_id"}
    assert set(EXPECTED) == set(t.fault.dropna()), "the world's faults and this table must agree"
    detail = rejects.set_index("uid").detail
    assert "404" in detail[faults.id[faults.fault == "http_404"].iloc[0]]
    assert "Connection refused" in detail[faults.id[faults.fault == "refused"].iloc[0]]
    dup = t.id[t.fault == "duplicate_id"].iloc[0]
    assert rejects[(rejects.uid == dup)].reason.tolist() == ["duplicate_uid"], "one of the two rows is kept"


def test_other_and_odd_images_come_out_decodable_rgb(downloaded):
    root, _, out = downloaded
    t = truth(root)
    table = ds.dataset(out / "data").to_table(columns=["uid", "image", "width", "height", "caption"])
    images = dict(zip(table.column("uid").to_pylist(), table.column("image").to_pylist()))
    for uid, variant in zip(t.id[t.variant.notna()], t.variant.dropna()):
        im = Image.open(io.BytesIO(images[uid]))
        assert im.mode in ("RGB", "L") and im.size == (64, 64), variant
    repaired = t.id[t.fault == "invalid_utf8_caption"].iloc[0]
    caption = dict(zip(table.column("uid").to_pylist(), table.column("caption").to_pylist()))[repaired]
    assert "\ufffd" in caption


@pytest.mark.slow
def test_retry_failed_refetches_only_retryable_rows_and_merges(downloaded, tmp_path):
    root, server, out = downloaded
    copy = tmp_path / "download"
    shutil.copytree(out, copy)
    t = truth(root)
    burst = t[t.fault == "http_500_burst"]
    not_found_path = t.url_path[t.fault == "http_404"].iloc[0]
    before = Counter(p for p, _ in server.requests)
    assert download_main(["--input", "unused", "--output", str(copy), "--retry-failed",
                          "--allow-host", f"127.0.0.1:{server.port}", "--allow-host", "127.0.0.1:1", *SETTINGS]) in (0, None)
    data, rejects = outcome(copy)
    assert set(burst.id) <= set(data.uid), "the 5xx burst is over: the retry recovers those rows"
    after = Counter(p for p, _ in server.requests)
    assert after[not_found_path] == before[not_found_path], "a 404 is not retried"
    manifest = read_manifest(copy)
    assert manifest["counts"]["input"] == read_manifest(out)["counts"]["input"]
    assert manifest["retries"][-1]["recovered"] >= len(burst)
    assert len(data) + len(rejects) == manifest["counts"]["input"] and not set(data.uid) & set(
        rejects.uid[rejects.reason != "duplicate_uid"])


@pytest.mark.slow
def test_opt_out_headers_are_honoured_with_user_agent_scoping(spark, probe_server, tmp_path):
    port = urllib.parse.urlsplit(probe_server).port
    headers = {"noai": True, "noimageai": True, "noindex, nofollow": True, "capfilt: noai": True,
               "img2dataset: noimageai": True, "otherbot: noai": False, "nofollow": False, "all": False}
    rows = [{"id": f"r{i}", "url": f"{probe_server}/robots/{urllib.parse.quote(h, safe='')}/x.png",
             "caption": "a red square"} for i, h in enumerate(headers)]
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    download_main(["--input", str(tmp_path / "m.parquet"), "--id-col", "id", "--output", str(tmp_path / "o"),
                   "--allow-host", f"127.0.0.1:{port}", *SETTINGS])
    data, rejects = outcome(tmp_path / "o")
    opted = {rows[int(u[1:])]["url"] for u in rejects.uid[rejects.reason == "opted_out"]}
    assert opted == {r["url"] for r, out in zip(rows, headers.values()) if out}
    assert len(data) == sum(not v for v in headers.values())


@pytest.mark.slow
def test_ssrf_probes_are_blocked_by_default(spark, world_site, probe_server, tmp_path):
    _, server, _ = world_site
    image = f"/img/{sorted(os.listdir(world_site[0] / 'site' / 'img'))[0]}"
    closed = 9  # discard port on loopback: not allow-listed
    targets = [
        f"http://10.0.0.1{image}", f"http://172.16.5.4{image}", f"http://192.168.1.1{image}",
        "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{server.port}{image}",
        f"http://[::ffff:127.0.0.1]:{closed}{image}", f"http://2130706433:{closed}{image}",
        f"http://0x7f000001:{closed}{image}", f"http://127.1:{closed}{image}", f"http://localhost:{closed}{image}",
        f"http://0.0.0.0:{closed}{image}", f"http://100.64.0.1{image}", f"http://[fe80::1]{image}",
        f"http://224.0.0.1{image}", f"http://127.0.0.1:{closed}{image}",
    ]
    redirects = [f"{probe_server}/to/{urllib.parse.quote(t, safe='')}" for t in
                 ("http://10.1.2.3/x.jpg", "http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{closed}/x")]
    allowed = f"http://127.0.0.1:{server.port}{image}"
    urls = targets + redirects + [allowed]
    pd.DataFrame({"id": [f"p{i}" for i in range(len(urls))], "url": urls,
                  "caption": ["probe"] * len(urls)}).to_parquet(tmp_path / "m.parquet")
    probe_port = urllib.parse.urlsplit(probe_server).port
    download_main(["--input", str(tmp_path / "m.parquet"), "--id-col", "id", "--output", str(tmp_path / "o"),
                   "--allow-host", f"127.0.0.1:{server.port}", "--allow-host", f"127.0.0.1:{probe_port}", *SETTINGS])
    data, rejects = outcome(tmp_path / "o")
    reasons = dict(zip(rejects.uid, rejects.reason))
    details = dict(zip(rejects.uid, rejects.detail))
    for i, url in enumerate(targets + redirects):
        assert reasons.get(f"p{i}") == "blocked_address", (url, reasons.get(f"p{i}"), details.get(f"p{i}"))
    assert data.url.tolist() == [allowed], "the allow-listed endpoint is fetched"


@pytest.mark.slow
def test_a_killed_download_resumes_and_skips_finished_shards(world_site, tmp_path):
    root, server, _ = world_site
    t = truth(root)
    plain = t.url_path[(t.kind == "clean") & t.variant.isna() & t.fault.isna()].str.removeprefix("/img/")
    # Every row is slow and each shard has 4 rows on one thread: the run can be killed mid-way.
    # Distinct files, so the server's request log (paths) tells which rows were fetched when.
    urls = [f"{server.base_url}/f/slow/250/{name}" for name in sorted(plain)[:24]]
    assert len(urls) == 24
    pd.DataFrame({"url": urls, "caption": ["a shape"] * len(urls)}).to_parquet(tmp_path / "m.parquet")
    out = tmp_path / "o"
    args = ["--input", str(tmp_path / "m.parquet"), "--output", str(out), "--allow-host",
            f"127.0.0.1:{server.port}", "--set", "spark.master=local[1]", "--set", "download.threads=1",
            "--set", "download.rows_per_shard=4", "--set", "spark.conf={spark.ui.enabled: 'false'}", *SETTINGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "capfilt.jobs.cli", "download", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / ".o.inprogress" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*_stats.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(shards.glob("*_stats.json"))
    assert 2 <= len(finished) < 6, "killed with some shards done and some not"
    assert not out.exists(), "nothing committed by the killed run"
    done_urls = set()
    for f in finished:
        done_urls |= set(pq.read_table(str(f).replace("_stats.json", ".parquet"), columns=["url"]).column("url").to_pylist())
    seen_before = Counter(p for p, _ in server.requests)
    subprocess.run([sys.executable, "-m", "capfilt.jobs.cli", "download", *args], env=env, check=True,
                   capture_output=True, timeout=300)
    fetched_again = {f"{server.base_url}{p}" for p in Counter(p for p, _ in server.requests) - seen_before}
    assert fetched_again and fetched_again <= set(urls)
    assert not fetched_again & done_urls, "rows of finished shards are not fetched again"
    assert fetched_again | done_urls == set(urls), "the rest is fetched by the rerun"
    data, rejects = outcome(out)
    assert sorted(data.url) == sorted(urls) and len(rejects) == 0
