"""Fault injection for tests and the soak benchmark: a killable Redis, frozen peers, PACS counts.

Everything here acts on processes this code started itself (never the system's Redis), on
127.0.0.1 ports chosen free at start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.orthanc import Orthanc
from tests.support.ports import free_port, wait_until_listening
from tests.support.process import ManagedProcess


class RedisServer(ManagedProcess):
    """A redis-server of our own on a free loopback port that keeps nothing on disk.

    `crash()` is kill -9; `start()` again brings it back empty on the same port, as a Redis
    without persistence comes back after a restart.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(folder / "redis.log")
        self.folder = folder
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found (install the Debian package 'redis')")
        self.folder.mkdir(parents=True, exist_ok=True)
        process = self.spawn(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            cwd=self.folder,
        )
        wait_until_listening(self.port, timeout=10, pid=process.pid)

    def crash(self) -> None:
        """SIGKILL: every queued and unacknowledged message is gone."""
        kill_hard(self.process)
        self.stop()


def kill_hard(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL one process we started and reap it."""
    assert process is not None and process.poll() is None, "process is not running"
    process.kill()
    process.wait(10)


@contextlib.contextmanager
def frozen(process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """SIGSTOP the process for the block: its sockets stay open but nothing answers."""
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def modality_counts(pacs: Orthanc, study_uid: str) -> dict[str, int]:
    """Instances per Modality that the PACS holds in the study ({} if it has none)."""
    study_id = pacs.find_study(study_uid)
    if study_id is None:
        return {}
    counts: dict[str, int] = {}
    for series in pacs.get_json(f"/studies/{study_id}/series"):
        modality = str(series["MainDicomTags"].get("Modality", ""))
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02
) -> None:
    """Poll `predicate` (a callable) until true; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what}")
        time.sleep(poll)
