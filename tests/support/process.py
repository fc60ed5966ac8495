"""A child server process for tests: output to a log file, stopped on exit of its `with` block."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.support.ports import tail, terminate


class ManagedProcess:
    """Subclasses implement `start()`; `with` starts it, and stops it however the block ends."""

    stop_grace = 10.0  # seconds between SIGTERM and SIGKILL

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def spawn(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `command` with stdout and stderr going to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            list(command), env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self.process

    def halt(self, process: subprocess.Popen[bytes]) -> None:
        """How the process is ended; SIGTERM, then SIGKILL after `stop_grace`."""
        terminate(process, grace=self.stop_grace)

    def stop(self) -> int | None:
        """End the process (if running) and close the log; returns its exit code."""
        code = None
        if self.process is not None:
            self.halt(self.process)
            code = self.process.returncode
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory process `pid` has held so far (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")
