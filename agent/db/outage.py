"""What a database that does not answer raises: PostgreSQL down or restarting, SQLite's disk
failing, locked or full. Transient: the work waits for it, it is never the work's failure."""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, TimeoutError

# OperationalError: connection refused or lost, "disk I/O error", "database is locked",
# "database or disk is full"; InterfaceError: a connection closed under us; TimeoutError: no
# pooled connection came free. Not IntegrityError or ProgrammingError: those are our bugs, and
# retrying them for ever would be a crash loop.
DB_UNAVAILABLE: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    TimeoutError,
)
