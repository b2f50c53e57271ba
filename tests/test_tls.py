"""HTTPS in the shapes world and in the fetcher: the world serves with a certificate from its own test CA,
download.ca_bundle makes the fetcher trust it, and an untrusted certificate or one for another name fails
the row with code tls, retried only when asked; a ca_bundle that is missing or holds no certificate is one
line before Spark."""

from __future__ import annotations

import re

import pytest
from img2dataset.downloader import download_image

from capfilt.jobs.curate import main as curate
from capfilt.net import fetch
from capfilt.net.fetch import check_ca_bundle
from capfilt.pipelines.download import CODE_PATTERN
from capfilt.world.server import serve
from capfilt.world.tls import CA_FILE, make_certificates
from helpers import shapes_args

PICTURE = "pic.png"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("site")
    (root / "img").mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "img" / PICTURE)
    return root


@pytest.fixture(scope="module")
def world_ca(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


def _fetch(url, timeout=5):
    """img2dataset's own download_image, through the installed opener."""
    _, stream, err = download_image((0, url), timeout, "capfilt", None)
    return (stream.getvalue() if stream else None), err


def _code(err: str) -> str:
    """The code the download stage files the failure under (the first word of the reject's detail)."""
    return re.match(CODE_PATTERN, err.removeprefix("<urlopen error ")).group(1)


def test_the_world_serves_https_and_the_fetcher_trusts_its_ca_when_told(site, world_ca, guarded_worker):
    guarded_worker(allow_hosts=("127.0.0.1",), ca_bundle=str(world_ca / CA_FILE))
    with serve(site, tls=world_ca) as server:
        assert server.base_url.startswith("https://127.0.0.1:")
        body, err = _fetch(f"{server.base_url}/img/{PICTURE}")
        assert err is None and body == (site / "img" / PICTURE).read_bytes()
        assert server.requests == [(f"/img/{PICTURE}", 200)]


def test_serve_hosts_addresses_are_in_the_certificate(site, world_ca, guarded_worker):
    from capfilt.world.server import serve_hosts
    guarded_worker(allow_hosts=("127.0.0.2", "127.0.0.9"), ca_bundle=str(world_ca / CA_FILE))
    with serve_hosts(site, 8, tls=world_ca) as servers:
        for server in (servers[0], servers[7]):
            body, err = _fetch(f"{server.base_url}/img/{PICTURE}")
            assert err is None and body, err


def test_an_untrusted_certificate_or_one_for_another_name_fails_as_tls(site, world_ca, tmp_path, guarded_worker,
                                                                       monkeypatch):
    sleeps = []  # the backoffs before retries (fetch.time.sleep is every thread's time.sleep)
    monkeypatch.setattr(fetch, "backoff_s", lambda attempt, base: sleeps.append(attempt) or 0.0)
    guarded_worker(allow_hosts=("127.0.0.1",), retries=2)  # the system's CAs: the test CA is not among them
    with serve(site, tls=world_ca) as server:
        body, err = _fetch(f"{server.base_url}/img/{PICTURE}")
        assert body is None and _code(err) == "tls" and "certificate verify failed" in err
        assert sleeps == [] and server.requests == []  # not retried, no request sent
    other = make_certificates(tmp_path / "other", ips=[], names=["other.example"])
    guarded_worker(allow_hosts=("127.0.0.1",), ca_bundle=str(other / CA_FILE), retries=2, retry_tls=True)
    with serve(site, tls=other) as server:
        body, err = _fetch(f"{server.base_url}/img/{PICTURE}")
        assert body is None and _code(err) == "tls" and "IP address mismatch" in err, err
        assert len(sleeps) == 2 and server.requests == []  # retried when asked (download.retry_tls)


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    (b"", "holds no certificate"),
    (b"not a certificate\n", "holds no certificate"),
    ("key", "holds no certificate"),
])
def test_a_ca_bundle_that_is_missing_or_holds_no_certificate_is_one_line_before_spark(
        content, says, world_ca, tmp_path, refused_before_spark):
    bundle = tmp_path / "ca.pem"
    if content == "key":
        bundle.write_bytes((world_ca / "server-key.pem").read_bytes())
    elif content is not None:
        bundle.write_bytes(content)
    with pytest.raises(ValueError, match=says):
        check_ca_bundle(str(bundle))
    err = refused_before_spark(curate, [*shapes_args(tmp_path), "--output", tmp_path / "out",
                                        "--set", f"download.ca_bundle={bundle}"], tmp_path)
    assert says in err and "download.ca_bundle" in err
    check_ca_bundle(str(world_ca / CA_FILE))  # the world's own passes


@pytest.mark.slow
def test_a_download_over_https_keeps_every_row_with_the_ca_and_fails_each_as_tls_without(site, world_ca, spark,
                                                                                          tmp_path):
    import pandas as pd
    import pyarrow.dataset as ds

    from capfilt.jobs.download import main as download_main
    from test_download import SETTINGS
    with serve(site, tls=world_ca, keep_alive=True) as server:
        rows = [{"id": f"r{i}", "url": f"{server.base_url}/img/{PICTURE}?{i}", "caption": "a red square"}
                for i in range(12)]
        pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
        args = ["--input", str(tmp_path / "m.parquet"), "--id-col", "id", "--allow-host", f"127.0.0.1:{server.port}",
                *SETTINGS]
        assert download_main([*args, "--output", str(tmp_path / "trusted"), "--set", "download.threads=1",
                              "--set", f"download.ca_bundle={world_ca / CA_FILE}"]) in (0, None)
        assert download_main([*args, "--output", str(tmp_path / "untrusted")]) in (0, None)
        served = server.connections
    assert ds.dataset(tmp_path / "trusted" / "data").count_rows() == 12
    rejects = ds.dataset(tmp_path / "untrusted" / "rejects").to_table().to_pandas()
    assert len(rejects) == 12 and set(rejects.reason) == {"failed_to_download"}
    assert all(d.startswith("tls: ") for d in rejects.detail), list(rejects.detail)
    # the per-host view of reuse: the manifest's aggregates, as inspect shows them
    from capfilt.pipelines.download_report import download_failures, failure_map
    from capfilt.pipelines.output import read_manifest
    figures = read_manifest(str(tmp_path / "trusted"))["connections"]
    host = figures["top_hosts"]["127.0.0.1"]
    assert figures["requests"] == host["requests"] == 12 and figures["hosts"] == 1
    # one thread per shard: each shard's requests take turns on one kept-alive connection
    assert 1 <= host["connections"] == host["tls_handshakes"] <= 2
    assert host["connections"] + read_manifest(str(tmp_path / "untrusted"))["connections"]["connections"] == served
    lines = failure_map(download_failures(spark, str(tmp_path / "trusted")))
    assert any(line.startswith(f"connections: {host['connections']} opened for 12 requests") for line in lines)


def test_world_serve_tls_with_a_broken_certificate_folder_is_one_line(tmp_path, capsys):
    from capfilt.world.cli import main as world
    from capfilt.world.corpus import make_web_corpus
    make_web_corpus(tmp_path / "corpus", n=40, seed=3)
    make_certificates(tmp_path / "corpus" / "tls")
    (tmp_path / "corpus" / "tls" / "server.pem").write_text("not a certificate\n")
    assert world(["serve", str(tmp_path / "corpus"), "--tls"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt world: error: ") and err.count("\n") == 1 and "does not load" in err
