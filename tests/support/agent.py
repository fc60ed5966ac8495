"""Run `pacs-agent serve` and `pacs-agent worker` as real processes with a generated config."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.db.database import Database
from agent.db.schema import Study
from agent.db.states import State
from agent.settings import load_settings
from tests.support.ports import free_port, wait_until_listening
from tests.support.process import ManagedProcess


def write_config(
    folder: Path,
    *,
    port: int,
    broker_url: str = "memory://",
    database_url: str = "",
    quiet_seconds: float = 1.5,
    max_retries: int = 8,
    give_up_after_seconds: float = 24 * 3600,
    destinations: list[tuple[str, str, int]] = (),  # type: ignore[assignment]
    extra: str = "",
) -> Path:
    """A TOML config for a test agent on 127.0.0.1; destinations are (ae_title, host, port).

    Unless `extra` has a [web] table, the web port takes any free port on 127.0.0.1, so that
    agents (and test runs) never collide on the default port.
    """
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
        f"max_retries = {max_retries}",
        "retry_backoff_seconds = 0.5",
        "retry_backoff_max_seconds = 2.0",
        "[database]",
        f'url = "{database_url}"',
        "[logging]",
        'level = "INFO"',
    ]
    if "[web]" not in extra.splitlines():
        lines += ["[web]", 'host = "127.0.0.1"', "port = 0"]
    for index, (aet, host, dport) in enumerate(destinations):
        lines += [
            "[[destinations]]",
            f'name = "pacs{index}"',
            f'ae_title = "{aet}"',
            f'host = "{host}"',
            f"port = {dport}",
            "retry_backoff_seconds = 0.5",
            "retry_backoff_max_seconds = 2.0",
            f"give_up_after_hours = {give_up_after_seconds / 3600!r}",
        ]
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def cli(
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the pacs-agent CLI to completion; `env` is added to this process's environment,
    from which PACS_AGENT_CONFIG is taken out (a test names its configuration itself)."""
    environ = {k: v for k, v in os.environ.items() if k != "PACS_AGENT_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**environ, **(env or {})},
        cwd=cwd,
    )


class AgentProcess(ManagedProcess):
    """One `pacs-agent <role>` process; output goes to a log file beside the config."""

    stop_grace = 30.0  # a warm shutdown lets the running task finish

    def __init__(self, config: Path, role: str = "serve", *args: str) -> None:
        super().__init__(config.parent / f"{role}-{time.monotonic_ns()}.log")
        self.config = config
        self.role = role
        self.args = args

    def start(self) -> None:
        command = [sys.executable, "-m", "agent.cli", self.role, "--config", str(self.config)]
        self.spawn([*command, *self.args], env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        assert self.process is not None
        wait_until_listening(port, timeout=timeout, pid=self.process.pid)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = text in self.log_path.read_text(errors="replace")
            self.assert_running()  # a process that logged the text and then died is no success
            if found:
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log_tail(60)}")

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"pacs-agent {self.role} exited with {self.process.returncode}:\n"
                f"{self.log_tail(60)}"
            )

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


@contextlib.contextmanager
def agent_database(config: Path) -> Iterator[Database]:
    """The database the agent with this config uses (by the agent's own default rule)."""
    db = Database(load_settings(config).database_url)
    try:
        yield db
    finally:
        db.dispose()


@contextlib.contextmanager
def serving_agent(folder: Path, **config: Any) -> Iterator[tuple[AgentProcess, Database, int]]:
    """`pacs-agent serve` on a free port, listening, with a config written under `folder`
    (`config` as write_config takes it); yields the process, its database and the port."""
    port = free_port()
    path = write_config(folder, port=port, **config)
    with agent_database(path) as db, AgentProcess(path, "serve") as agent:
        agent.wait_listening(port)
        yield agent, db, port


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


__all__ = [
    "AgentProcess",
    "agent_database",
    "cli",
    "free_port",
    "wait_for_study",
    "write_config",
]
