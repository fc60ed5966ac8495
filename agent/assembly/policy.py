"""When is a study complete? A pure rule over arrival times and an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def is_complete(last_arrival: datetime, now: datetime, quiet_seconds: float) -> bool:
    """A study is complete once `quiet_seconds` have passed without a new instance.

    DICOM has no end-of-study message for C-STORE (PS3.4 Annex B), so silence is the signal.
    """
    if last_arrival.tzinfo is None:
        last_arrival = last_arrival.replace(tzinfo=UTC)
    return now - last_arrival >= timedelta(seconds=quiet_seconds)


def seconds_until_complete(last_arrival: datetime, now: datetime, quiet_seconds: float) -> float:
    if last_arrival.tzinfo is None:
        last_arrival = last_arrival.replace(tzinfo=UTC)
    return max(0.0, quiet_seconds - (now - last_arrival).total_seconds())
