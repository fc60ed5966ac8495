"""Completeness timing with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.assembly.policy import is_complete, seconds_until_complete

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_not_complete_before_quiet_period() -> None:
    assert not is_complete(T0, T0 + timedelta(seconds=29.9), 30)
    assert seconds_until_complete(T0, T0 + timedelta(seconds=10), 30) == 20


def test_complete_exactly_at_and_after_quiet_period() -> None:
    assert is_complete(T0, T0 + timedelta(seconds=30), 30)
    assert is_complete(T0, T0 + timedelta(hours=1), 30)
    assert seconds_until_complete(T0, T0 + timedelta(seconds=31), 30) == 0


def test_naive_timestamps_from_the_database_are_utc() -> None:
    naive = T0.replace(tzinfo=None)
    assert is_complete(naive, T0 + timedelta(seconds=2), 1.5)
    assert not is_complete(naive, T0 + timedelta(seconds=1), 1.5)
