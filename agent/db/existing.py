"""Opening the database a read-only command reads: one that exists, never a new one."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from agent.db.database import Database
from agent.errors import AgentError


class NoDatabase(AgentError):
    """There is no pacs-agent database where the configuration points."""


def display_url(url: str) -> str:
    """The database URL as a message may show it: without its password."""
    try:
        # URL is a NamedTuple; its own set() takes None for "unchanged".
        return make_url(url)._replace(password=None).render_as_string(hide_password=False)
    except ArgumentError:  # not a URL SQLAlchemy reads: its scheme says enough
        return url.split("://", 1)[0] + "://…"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database (or SQLite in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_existing(url: str) -> Database:
    """The database at `url`, which a service has created before; NoDatabase otherwise.

    Opening a SQLite URL would create its file, and `create_schema` the tables of an empty
    PostgreSQL database: a command that only reads must not leave either behind in a place
    the service never uses. Tables an older version created are brought up to date (only
    additive changes, as the service itself makes at its start), so that they can be read.
    """
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise NoDatabase(f"no database at {display_url(url)}")
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            present = inspect(conn).has_table("study")
        if not present:
            raise NoDatabase(f"no pacs-agent tables in the database {display_url(url)}")
        db.create_schema()
    except BaseException:
        db.dispose()
        raise
    return db
