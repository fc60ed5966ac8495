"""Task retry policy."""

from __future__ import annotations

from agent.queue.tasks import backoff_seconds


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, 5, 60) for n in range(6)] == [5, 10, 20, 40, 60, 60]
