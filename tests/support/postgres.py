"""A PostgreSQL of our own (never the system's): its own cluster on a free port, ours to stop
and start again with its data, as a database server that goes down and comes back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.support.ports import free_port, wait_until_listening


def _binary(name: str) -> str | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else shutil.which(name)


class PostgresServer:
    """`postgres` in the foreground; `stop()` is a fast shutdown (sessions cut), `start()`
    brings it back on the same port with the same data."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its folders are the test user's alone, and the server
        # runs as the postgres user when the tests run as root.
        folder = Path(tempfile.mkdtemp(prefix="pg-"))
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        initdb, self._postgres = _binary("initdb"), _binary("postgres")
        if initdb is None or self._postgres is None:
            pytest.skip("no PostgreSQL server binaries (initdb, postgres) here")
        self._user = "postgres" if os.geteuid() == 0 else None
        folder.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(folder, self._user)
        subprocess.run(
            [initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            user=self._user,
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        assert self._postgres is not None
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                self._postgres,
                "-D",
                str(self.folder / "data"),
                "-p",
                str(self.port),
                "-k",
                str(self.folder),
                "-h",
                "127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
        )
        log.close()
        wait_until_listening(self.port, timeout=30, pid=self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: cuts every session
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
