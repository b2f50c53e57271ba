import os
import sys
from pathlib import Path

# The environment the README asks for, also when pytest is run by hand.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# The JVMs of a test run live seconds to minutes: the C1 compiler alone and the serial collector spend
# less CPU on them (measured on 2 cores, two runs each: 10 JVM-heavy tests 50.5 -> 45.9 s; a killed curate
# and a spark-submit, both CLI subprocesses, 160.7 -> 139.6 s). What Spark computes is unchanged.
os.environ.setdefault("JDK_JAVA_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _test_session():
    """The one SparkSession of the test run, made on first use: a test or fixture that asks for `spark`,
    or a job called in-process (download_main...), whose spark_session() takes the active session.
    Tests that never reach Spark start no JVM (a run of only those takes seconds)."""
    from pyspark.sql import SparkSession

    from capfilt.pipelines.config import SparkSettings
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    return _job_session(SparkSettings(master="local[2]", shuffle_partitions=4, log_level="ERROR",
                                      conf={"spark.ui.enabled": "false"}))


def _lazy_spark_session(settings=None):
    return _test_session()  # a job's own settings never make the tests' session


from capfilt.pipelines import session as _session  # noqa: E402

_job_session = _session.spark_session
_session.spark_session = _lazy_spark_session


# A test that reads one of these runs pays for it the first time (on 2 cores: curated_out, a whole
# `capfilt curate`, about a minute; shapes_world, a dedup of a planted shapes corpus, and crawl_out, a
# download of a crawl with every failure, 6-10 s): it belongs to the slow tier whatever its own duration.
SLOW_FIXTURES = ("curated_out", "shapes_world", "crawl_out")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if set(SLOW_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    from pyspark.sql import SparkSession
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


@pytest.fixture(scope="session")
def spark():
    """The tests' SparkSession (started here if no test has needed it yet)."""
    return _test_session()


@pytest.fixture(scope="session")
def world_site(tmp_path_factory):
    """A small shapes-world web corpus (every fault kind and image variant at least once), served on
    127.0.0.1 for the whole session. Yields (corpus_dir, server, metadata_path)."""
    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve
    root = tmp_path_factory.mktemp("world")
    make_web_corpus(root, n=120, seed=7, slow_ms=1500, burst=1)
    with serve(root / "site") as server:
        yield root, server, write_metadata(root, server.base_url)


@pytest.fixture(scope="session")
def probe_server():
    """A loopback server for SSRF and opt-out probes: /to/<quoted url> redirects there;
    /robots/<quoted header>/x.png serves a PNG with that X-Robots-Tag header."""
    import io
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buf, "PNG")
    png = buf.getvalue()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = self.path.split("/")
            if parts[1] == "to":
                self.send_response(302)
                self.send_header("Location", urllib.parse.unquote(parts[2]))
                self.end_headers()
            elif parts[1] == "robots":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("X-Robots-Tag", urllib.parse.unquote(parts[2]))
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def curate_site(tmp_path_factory):
    """Another small corpus and server, for the whole-chain tests: the download tests count the
    world_site server's 5xx bursts (first request per path), so those must stay theirs."""
    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.server import serve
    root = tmp_path_factory.mktemp("curate-world")
    make_web_corpus(root, n=120, seed=8, slow_ms=1500, burst=1)
    with serve(root / "site") as server:
        yield root, server, write_metadata(root, server.base_url)


@pytest.fixture(scope="session")
def clip_link(tmp_path_factory):
    """The shapes CLIP behind a symlink: a test removes the link to make the reference unloadable."""
    from capfilt.udfs.models import SHAPES_CLIP
    link = tmp_path_factory.mktemp("models") / "shapes-clip"
    link.symlink_to(SHAPES_CLIP, target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def curate_args(curate_site, clip_link):
    """Arguments for `capfilt curate` on the curate_site corpus with the demo's settings (the project's
    shapes-world models; the CLIP through clip_link), minus --output."""
    from capfilt.jobs.demo import _as_overrides, shapes_world_settings
    from capfilt.pipelines.config import load_config
    _, server, metadata = curate_site
    return ["--input", str(metadata), "--id-col", "id", "--allow-host", f"127.0.0.1:{server.port}",
            "--allow-host", "127.0.0.1:1", "--no-progress",
            # One retry: the corpus's 5xx bursts (first request per path) end the same in every run.
            *_as_overrides(shapes_world_settings(load_config(None, ["download.retries=1"]))),
            "--set", f"filter.model={clip_link}"]


@pytest.fixture(scope="session")
def curated_out(curate_args, tmp_path_factory):
    """A finished `capfilt curate` output of the world_site corpus (OUT: stages/, curated/, rejects/,
    manifest.json). Tests must not change it: copy it first."""
    from capfilt.jobs.curate import main as curate
    out = tmp_path_factory.mktemp("curate") / "out"
    assert curate([*curate_args, "--output", str(out)]) == 0
    return out


@pytest.fixture
def loopback_only():
    from capfilt.net import netguard
    netguard.refuse_non_loopback()
    netguard.refused_attempts.clear()
    yield netguard.refused_attempts
    netguard.allow_any_connect()


@pytest.fixture
def guarded_worker(loopback_only):
    """prepare_worker(policy) as a download worker does; the process-wide opener is restored after."""
    import urllib.request

    from capfilt.net import fetch
    from capfilt.net.fetch import FetchPolicy

    def install(**kwargs):
        fetch.prepare_worker(FetchPolicy(loopback_only=True, **kwargs))
    try:
        yield install
    finally:
        fetch._installed = fetch._opener = None
        urllib.request.install_opener(None)


@pytest.fixture
def no_spark(monkeypatch):
    """Fails the test if a job asks for a SparkSession: what a job refuses, it refuses before any work."""
    def started(*args, **kwargs):
        pytest.fail("Spark was started before the arguments were refused")
    monkeypatch.setattr("capfilt.pipelines.session.spark_session", started)


@pytest.fixture
def refused_before_spark(monkeypatch, capsys):
    """refused(main, argv, folder) -> the error line: asserts that the job exits 2 with one line
    `capfilt: error: ...`, that it never asked for a SparkSession (a refusal that came after the job
    asked for Spark fails here, whether or not a session is running), and that `folder` holds no hidden
    folder or lock."""
    from capfilt.jobs.common import run
    from capfilt.pipelines import session

    def no_spark(*args, **kwargs):
        raise AssertionError("the job asked for a SparkSession before refusing")

    def refused(main, argv, folder):
        with monkeypatch.context() as patched:
            patched.setattr(session, "spark_session", no_spark)
            assert run(main, [str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("capfilt: error: ") and err.count("\n") == 1, err
        assert not [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]
        return err
    return refused
