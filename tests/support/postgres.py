"""A throwaway PostgreSQL cluster on a free loopback port, which a test may stop and start."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.ci import unavailable
from tests.support.ports import free_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class Cluster:
    """initdb, then `start()`/`stop()` at will; `with` removes it. Database `test` exists.

    Stopping is `-m immediate`: the server goes away as it would on a crash or a restart,
    cutting every connection.
    """

    def __init__(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            unavailable("no initdb/pg_ctl to start a PostgreSQL cluster")
        assert initdb is not None and pg_ctl is not None
        self._pg_ctl = pg_ctl
        self.work = Path(tempfile.mkdtemp(prefix="pg-"))
        self._user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._user:
            shutil.chown(self.work, "postgres")
        self.port = free_port()
        subprocess.run(
            [*self._user, initdb, "-D", str(self.work / "data"), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        self.start()
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE test")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.work} -h 127.0.0.1"
        data, log = str(self.work / "data"), str(self.work / "log")
        subprocess.run(
            [*self._user, self._pg_ctl, "-D", data, "-l", log, "-w", "-o", options, "start"],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self._user, self._pg_ctl, "-D", str(self.work / "data"), "-m", "immediate", "stop"],
            capture_output=True,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)
