"""The database tables (SQLAlchemy models), their creation, additive migration."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import DefaultClause

# Any fixed 64-bit number; it names "pacs-agent schema creation" among advisory locks.
_SCHEMA_LOCK_KEY = 0x7061637361676E74

# `Study.purged_at` of a study whose files the retention sweep has never deleted.
NEVER_PURGED = datetime(1970, 1, 1, tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class UtcDateTime(DateTime):
    """Timezone-aware UTC timestamps on every backend (SQLite drops the zone on its own)."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_key: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Revision of the results: +1 each time a different input is queued (late arrivals).
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Digest of the queued job's input, and of the input whose results were last sent.
    input_digest: Mapped[str] = mapped_column(String(64), default="", server_default="")
    done_digest: Mapped[str] = mapped_column(String(64), default="", server_default="")
    first_arrival: Mapped[datetime] = mapped_column(UtcDateTime())
    last_arrival: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # When the retention sweep last deleted the study's files; a change after that (a late
    # instance reopening it) makes the study's new files due for the sweep in their turn.
    purged_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), default=NEVER_PURGED, server_default="1970-01-01 00:00:00+00:00"
    )
    # Why the sender's delivery of the study was last cut short (an association aborted, an
    # instance refused for want of resources) and when; empty once a clean re-send, begun
    # after it, makes up for it, or once the study is sealed.
    interruption: Mapped[str] = mapped_column(Text, default="", server_default="")
    interrupted_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), default=NEVER_PURGED, server_default="1970-01-01 00:00:00+00:00"
    )
    # agent.logs.accession_digest of the study's AccessionNumber, from its first instance
    # that has one; "" until then. `status` looks a study up by it.
    accession_hash: Mapped[str] = mapped_column(
        String(64), default="", server_default="", index=True
    )


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("study_id", "sop_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # SHA-256 of the dataset after its file meta group; empty for a row of an older version.
    digest: Mapped[str] = mapped_column(String(64), default="", server_default="")


class Transition(Base):
    __tablename__ = "transition"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UtcDateTime())


class Delivery(Base):
    """One job's objects on their way to one destination: when it began, how it is going."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("job_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # The export ceiling counts from here; `pacs-agent retry` starts it again.
    first_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # How many objects the job has for this destination, known before the first is sent.
    objects: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ResultStamp(Base):
    """When a result was first encoded: the Content, Instance Creation and Contribution
    Date/Time of its objects, so that every later encoding of it (a retry, a re-send after a
    crash, a repeat of the same input) gives the same bytes under the same UIDs (PS3.5 9)."""

    __tablename__ = "result_stamp"

    # The SOP Instance UID of the result's BINARY SEG (agent.dicom.uids.output_uids): it
    # names the result, its inputs, model, weights and encoder.
    result_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    made_at: Mapped[datetime] = mapped_column(UtcDateTime())


class SentObject(Base):
    """The last C-STORE status a destination gave one of a job's objects (PS3.4 B.2.3)."""

    __tablename__ = "sent_object"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    stored: Mapped[bool] = mapped_column(Boolean)
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UtcDateTime())


class DestinationHealth(Base):
    """A destination's circuit breaker, shared by every worker process through the database."""

    __tablename__ = "destination_health"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    # While in the future, nobody connects; the first worker past it claims one probe.
    open_until: Mapped[datetime] = mapped_column(UtcDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class SourceWatch(Base):
    """A source the poller watches, since when (its first search set the baseline)."""

    __tablename__ = "source_watch"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    since: Mapped[datetime] = mapped_column(UtcDateTime())


class SourceStudy(Base):
    """A study a source's poller has found: pulled, known already, or failed and due again."""

    __tablename__ = "source_study"
    __table_args__ = (UniqueConstraint("source", "study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))
    # pulled, baseline (there before watching began), known (received otherwise), failed.
    outcome: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A failed pull is tried again from then on.
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ModelSwitch(Base):
    """An operator's run-time override of a model's configured state: on, paused or off."""

    __tablename__ = "model_switch"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class JobLease(Base):
    """Which worker runs a job's task now: renewed while it runs, deleted when it returns; one
    whose `expires_at` has passed lost its worker (killed, out of memory, its node gone)."""

    __tablename__ = "job_lease"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    renewed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


def create_schema(engine: Engine) -> None:
    """Create missing tables; safe when serve and workers start at the same moment.

    PostgreSQL serialises the creators with a transaction-scoped advisory lock. SQLite has
    no such lock, so a creator that loses the race (its check said "missing", the other's
    CREATE came first) simply checks again.
    """
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                    )
                Base.metadata.create_all(conn)
                _add_missing_columns(conn)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _add_missing_columns(conn: Connection) -> None:
    """Add columns (and their indexes) that a newer version defines to tables an older
    version created.

    Only additive changes are made this way; each new column has a server default.
    """
    present = inspect(conn)
    for table in Base.metadata.sorted_tables:
        existing = {c["name"] for c in present.get_columns(table.name)}
        indexed = {ix["name"] for ix in present.get_indexes(table.name)}
        for column in table.columns:
            if column.name in existing:
                continue
            kind = column.type.compile(dialect=conn.dialect)
            default = column.server_default
            clause = ""
            if isinstance(default, DefaultClause) and isinstance(default.arg, str):
                clause = " DEFAULT '" + default.arg.replace("'", "''") + "'"
            conn.execute(
                text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind} NOT NULL{clause}")
            )
        for index in table.indexes:
            if index.name not in indexed:
                index.create(conn)
