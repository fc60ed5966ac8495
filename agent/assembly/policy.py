"""When is a study complete? A pure rule over monotonic arrival times and an injected clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

# Why a study was sealed, as its `complete` transition records it.
QUIET_PERIOD = "quiet period"
# Every reason for sealing on an input that may lack instances says this; the note then goes
# with the job to the study's final state, so nobody takes the results for the whole study's.
PARTIAL = "input may be partial"


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock UTC, for timestamps people read."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock no NTP step moves, for every duration."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class Interrupted:
    """The sender's delivery was cut short at `since` (monotonic): `what` happened."""

    since: float
    what: str


@dataclass(frozen=True)
class Decision:
    """Seal now (`why` for the `complete` transition) or not yet (`waiting`: what for, when
    that is more than silence)."""

    seal: bool
    why: str = ""
    waiting: str = ""


def decide(
    now: float,
    *,
    last_arrival: float,
    opened: float,
    quiet_seconds: float,
    interrupted: Interrupted | None = None,
    sender_retry_seconds: float = 0.0,
    max_wait_seconds: float | None = None,
) -> Decision:
    """Whether a receiving study is complete, all times on one monotonic clock.

    DICOM has no end-of-study message for C-STORE (PS3.4 Annex B), so silence is the signal:
    `quiet_seconds` without a new instance. A sender whose association (or STOW-RS request)
    broke, or whose instances were refused for want of resources, is expected to send again
    (PS3.4 B.2.3: the SCU keeps what was not acknowledged), so such a study waits up to
    `sender_retry_seconds` for it; and a study that never falls silent is sealed
    `max_wait_seconds` after it opened. Both are sealed with a note that the input may be
    partial.
    """
    if max_wait_seconds is not None and now - opened >= max_wait_seconds:
        return Decision(
            True, f"receiving for {max_wait_seconds:.0f} s: {PARTIAL} (instances still arriving)"
        )
    if now - last_arrival < quiet_seconds:
        return Decision(False)
    if interrupted is None:
        return Decision(True, QUIET_PERIOD)
    if now - interrupted.since < sender_retry_seconds:
        return Decision(
            False,
            waiting=(
                f"waiting up to {sender_retry_seconds:.0f} s for the sender to send again: "
                f"{interrupted.what}"
            ),
        )
    return Decision(
        True,
        f"not sent again: {PARTIAL} ({interrupted.what}; waited {sender_retry_seconds:.0f} s)",
    )
