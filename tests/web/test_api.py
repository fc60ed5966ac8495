"""The JSON API over real HTTP on 127.0.0.1: health and its spool check."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.web import WebAgent, session, web_settings

WAIT_SECONDS = 10.0


def _immutable(folder: Path, on: bool) -> bool:
    """chattr +i / -i: as root, a mode of 0o555 does not stop writes, the immutable flag does."""
    flag = "+i" if on else "-i"
    done = subprocess.run(["chattr", flag, str(folder)], capture_output=True, check=False)
    return done.returncode == 0


def test_health_is_503_while_the_spool_cannot_be_written(tmp_path: Path) -> None:
    with WebAgent(tmp_path, web_settings(tmp_path)) as agent:
        url = f"{agent.url}/api/health"
        assert session(None).get(url, timeout=10).json()["spool"] == "ok"
        if not _immutable(agent.layout.tmp, True):
            pytest.skip("chattr +i is not available on this filesystem")
        try:
            deadline = time.monotonic() + WAIT_SECONDS  # past the probe's cache
            while (answer := session(None).get(url, timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.1)
            assert answer.status_code == 503
            assert answer.json()["status"] == "error"
            assert answer.json()["spool"] == "not writable (Operation not permitted)"
        finally:
            _immutable(agent.layout.tmp, False)
        deadline = time.monotonic() + WAIT_SECONDS
        while (answer := session(None).get(url, timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        assert answer.json()["spool"] == "ok"
        assert agent.leftovers() == []  # the probe's file is removed
