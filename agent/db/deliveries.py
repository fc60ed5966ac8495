"""Delivery records: per job and destination, per object sent, and each destination's breaker.

These rows let an export resume where it stopped: an object a destination has stored is not
sent to it again, a destination that is down is not hammered by every worker at once, and the
ceiling after which a study fails counts from the first attempt, across worker restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from agent.db.database import Database, as_utc, utcnow
from agent.db.schema import NEVER_PURGED, Delivery, DestinationHealth, SentObject


def is_stored(status: int) -> bool:
    """PS3.4 B.2.3: success, and every warning (0xBxxx: coercion, elements discarded, ...)."""
    return status == 0x0000 or (status & 0xF000) == 0xB000


@dataclass(frozen=True)
class ObjectStatus:
    """What a destination answered for one object."""

    sop_uid: str
    sop_class_uid: str
    status: int
    comment: str = ""

    @property
    def stored(self) -> bool:
        return is_stored(self.status)


@dataclass(frozen=True)
class DeliveryView:
    """One destination's progress with a job, for `pacs-agent status KEY`."""

    destination: str
    first_attempt_at: datetime
    attempts: int
    last_error: str
    objects: tuple[ObjectStatus, ...]  # the destination's answers so far
    expected: int = 0  # the objects to deliver (0: not known, as in rows of older versions)

    @property
    def stored(self) -> int:
        """How many of the objects the destination has confirmed stored."""
        return sum(o.stored for o in self.objects)

    @property
    def total(self) -> int:
        return max(self.expected, len(self.objects))


class Deliveries:
    """The delivery tables of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def begin(self, job_id: str, destination: str, objects: int = 0) -> DeliveryView:
        """The (job, destination) delivery so far, recording now as its first attempt if new,
        and `objects` as the number to deliver when given."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            row = _delivery_row(s, job_id, destination)
            if row is None:
                row = Delivery(
                    job_id=job_id,
                    destination=destination,
                    first_attempt_at=now,
                    attempts=0,
                    last_error="",
                    updated_at=now,
                    objects=objects,
                )
                s.add(row)
            elif objects and row.objects != objects:
                row.objects = objects
            return DeliveryView(
                destination,
                as_utc(row.first_attempt_at),
                row.attempts,
                row.last_error,
                (),
                row.objects,
            )

    def stored(self, job_id: str, destination: str) -> set[str]:
        """SOP Instance UIDs the destination has already stored for this job."""
        with self._db.session() as s:
            return set(
                s.scalars(
                    select(SentObject.sop_uid).where(
                        SentObject.job_id == job_id,
                        SentObject.destination == destination,
                        SentObject.stored.is_(True),
                    )
                )
            )

    def record(self, job_id: str, destination: str, outcome: ObjectStatus) -> None:
        """Keep the destination's latest answer for one object."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            row = s.scalar(
                select(SentObject).where(
                    SentObject.job_id == job_id,
                    SentObject.destination == destination,
                    SentObject.sop_uid == outcome.sop_uid,
                )
            )
            if row is None:
                row = SentObject(job_id=job_id, destination=destination, sop_uid=outcome.sop_uid)
                s.add(row)
            row.sop_class_uid = outcome.sop_class_uid
            row.status = outcome.status
            row.stored = outcome.stored
            row.comment = outcome.comment[:500]
            row.at = now

    def attempted(self, job_id: str, destination: str, error: str = "") -> int:
        """Count one attempt (with its error, if it failed); returns the attempts so far."""
        with self._db.session() as s, s.begin():
            row = _delivery_row(s, job_id, destination)
            if row is None:
                return 0
            row.attempts += 1
            row.last_error = error
            row.updated_at = utcnow()
            return row.attempts

    def restart(self, job_id: str) -> None:
        """Start the job's export ceilings again from now (an operator asked to retry)."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            s.execute(
                update(Delivery)
                .where(Delivery.job_id == job_id)
                .values(first_attempt_at=now, attempts=0, updated_at=now)
            )

    def of_job(self, job_id: str) -> list[DeliveryView]:
        with self._db.session() as s:
            rows = s.scalars(
                select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.destination)
            ).all()
            objects = s.scalars(
                select(SentObject).where(SentObject.job_id == job_id).order_by(SentObject.id)
            ).all()
        return [
            DeliveryView(
                row.destination,
                as_utc(row.first_attempt_at),
                row.attempts,
                row.last_error,
                tuple(
                    ObjectStatus(o.sop_uid, o.sop_class_uid, o.status, o.comment)
                    for o in objects
                    if o.destination == row.destination
                ),
                row.objects,
            )
            for row in rows
        ]

    # -- circuit breaker ------------------------------------------------------------------------

    def breaker(self, name: str) -> tuple[int, datetime]:
        """(consecutive failures, open until) for a destination; never seen is (0, the past)."""
        with self._db.session() as s:
            row = s.get(DestinationHealth, name)
            if row is None:
                return (0, NEVER_PURGED)
            return (row.consecutive_failures, as_utc(row.open_until))

    def claim_probe(self, name: str, now: datetime, hold: timedelta) -> bool:
        """Whether this worker is the one to try an open breaker's destination now."""
        with self._db.session() as s, s.begin():
            claimed = s.execute(
                update(DestinationHealth)
                .where(DestinationHealth.name == name, DestinationHealth.open_until <= now)
                .values(open_until=now + hold, updated_at=now)
            )
            return cast(CursorResult[Any], claimed).rowcount == 1

    def failed(self, name: str, error: str, open_for: Callable[[int], float | None]) -> int:
        """Count a failure; `open_for(failures)` says for how long to open (None: stay closed)."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            row = s.get(DestinationHealth, name, with_for_update=True)
            if row is None:
                row = DestinationHealth(
                    name=name, consecutive_failures=0, open_until=NEVER_PURGED, updated_at=now
                )
                s.add(row)
            row.consecutive_failures += 1
            row.last_error = error[:500]
            row.updated_at = now
            seconds = open_for(row.consecutive_failures)
            if seconds is not None:
                row.open_until = now + timedelta(seconds=seconds)
            return row.consecutive_failures

    def succeeded(self, name: str) -> None:
        now = utcnow()
        with self._db.session() as s, s.begin():
            row = s.get(DestinationHealth, name, with_for_update=True)
            if row is not None:
                row.consecutive_failures = 0
                row.open_until = NEVER_PURGED
                row.last_error = ""
                row.updated_at = now


def _delivery_row(s: Session, job_id: str, destination: str) -> Delivery | None:
    return s.scalar(
        select(Delivery)
        .where(Delivery.job_id == job_id, Delivery.destination == destination)
        .with_for_update()
    )
