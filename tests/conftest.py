"""Shared fixtures: real Redis and PostgreSQL (the local ones, or our own), CI-aware skipping."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.db.database import Database
from tests.support.ci import unavailable
from tests.support.ports import free_port
from tests.support.postgres import Cluster


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _listening(port):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the one on 127.0.0.1:6379, else one started here on a free port."""
    if _listening(6379):
        yield "redis://127.0.0.1:6379/15"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("no Redis on 127.0.0.1:6379 and no redis-server to start")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not _wait_port(port, 10):
            unavailable("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/15"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL database, emptied first: the local one, else a throwaway cluster."""
    pytest.importorskip("psycopg")
    import psycopg

    if _listening(5432):
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        try:
            with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres") as conn:
                conn.execute("DROP SCHEMA IF EXISTS pacs_agent_test CASCADE")
        except psycopg.Error as exc:
            unavailable(f"PostgreSQL on 127.0.0.1:5432 refused: {exc}")
        yield url
        return
    with Cluster() as cluster:
        yield cluster.url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each configurable database backend, empty."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agent.db'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine

    from agent.db.schema import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    yield url
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A database with its schema, on each configurable backend."""
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()
