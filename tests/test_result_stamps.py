"""When each result was first encoded: recorded once, the same for every later encoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect, text

from agent.db.database import Database
from agent.db.stamps import ResultStamps

T0 = datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
RESULT = "2.25.1234"


def test_the_first_time_stands_for_every_later_encoding(db: Database) -> None:
    stamps = ResultStamps(db)
    assert stamps.made_at(RESULT, T0) == T0
    assert stamps.made_at(RESULT, T0 + timedelta(hours=3)) == T0
    # Another result has its own time.
    assert stamps.made_at("2.25.5678", T0 + timedelta(days=1)) == T0 + timedelta(days=1)


def test_the_time_survives_a_restart(database_url: str) -> None:
    first = Database(database_url)
    try:
        first.create_schema()
        ResultStamps(first).made_at(RESULT, T0)
    finally:
        first.dispose()
    second = Database(database_url)
    try:
        second.create_schema()
        assert ResultStamps(second).made_at(RESULT, T0 + timedelta(minutes=5)) == T0
    finally:
        second.dispose()


def test_a_database_of_an_older_version_gains_the_table(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.create_schema()
        with db.engine.begin() as conn:
            conn.execute(text("DROP TABLE result_stamp"))
        db.create_schema()
        assert inspect(db.engine).has_table("result_stamp")
        assert ResultStamps(db).made_at(RESULT, T0) == T0
    finally:
        db.dispose()
