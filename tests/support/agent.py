"""Run `pacs-agent serve` and `pacs-agent worker` as real processes with a generated config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from agent.db import Database, State, Study
from tests.support.ports import free_port, tail, wait_until_listening


def write_config(
    folder: Path,
    *,
    port: int,
    broker_url: str = "memory://",
    database_url: str = "",
    quiet_seconds: float = 1.5,
    max_retries: int = 8,
    destinations: list[tuple[str, str, int]] = (),  # type: ignore[assignment]
    extra: str = "",
) -> Path:
    """A TOML config for a test agent on 127.0.0.1; destinations are (ae_title, host, port)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[receiver]",
        'ae_title = "PACS_AGENT"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "[spool]",
        'path = "spool"',
        "[study]",
        f"quiet_seconds = {quiet_seconds}",
        "[queue]",
        f'broker_url = "{broker_url}"',
        f"export_max_retries = {max_retries}",
        "retry_backoff_seconds = 0.5",
        "retry_backoff_max_seconds = 2.0",
        "[database]",
        f'url = "{database_url}"',
        "[logging]",
        'level = "INFO"',
    ]
    for index, (aet, host, dport) in enumerate(destinations):
        lines += [
            "[[destinations]]",
            f'name = "pacs{index}"',
            f'ae_title = "{aet}"',
            f'host = "{host}"',
            f"port = {dport}",
        ]
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the pacs-agent CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class AgentProcess:
    """One `pacs-agent <role>` process; output goes to a log file beside the config."""

    def __init__(self, config: Path, role: str = "serve", *args: str) -> None:
        self.config = config
        self.role = role
        self.args = args
        self.log_path = config.parent / f"{role}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Self:
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                self.role,
                "--config",
                str(self.config),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        return self

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        assert self.process is not None
        wait_until_listening(port, timeout=timeout, pid=self.process.pid)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            self.assert_running()
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log_tail()}")

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"pacs-agent {self.role} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        code = 0
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_for_study(
    db: Database,
    study_uid: str,
    states: set[State],
    timeout: float,
    on_timeout: Callable[[], str] = lambda: "",
) -> Study:
    """Poll the database until the study reaches one of `states` (monotonic deadline)."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        study = db.get(study_uid)
        if study is not None and study.state in states:
            return study
        time.sleep(0.2)
    state = "unknown" if study is None else f"{study.state} ({study.reason})"
    raise AssertionError(f"study still {state} after {timeout} s\n{on_timeout()}")


__all__ = ["AgentProcess", "cli", "free_port", "wait_for_study", "write_config"]
