"""Fixtures of the fault tests: a PACS and a Redis of the test's own, to stop and kill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import RedisServer
from tests.support.orthanc import Orthanc


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc with a kept workdir, so it can be stopped and started again with its data."""
    with Orthanc(tmp_path / "pacs") as orthanc:
        yield orthanc


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Our own Redis (never the system's): free port, nothing on disk, ours to kill."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
