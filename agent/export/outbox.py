"""The export outbox: a job's encoded objects, delivered to each destination on its own terms
(C-STORE or STOW-RS).

The objects are in the job's outbox folder (written before any send, named by SOP Instance
UID). Per destination, what it has stored is recorded instance by instance, so a new attempt
sends only the rest; failures back off exponentially with jitter; a circuit breaker shared
through the database keeps every worker from hammering a destination that is down; and a
ceiling, counted from the first attempt, ends the study `failed: export to <name>`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.uid import UID

from agent import audit
from agent.db.database import utcnow
from agent.db.deliveries import Deliveries, DeliveryView, ObjectStatus
from agent.errors import RetryableError
from agent.export import dimse, stow
from agent.settings import DestinationSettings

log = logging.getLogger(__name__)

# How long one worker's probe of an open breaker keeps the others away.
PROBE_HOLD = timedelta(seconds=120)
# Out of resources (PS3.4 B.2.3, A7xx): the destination may take the object later.
TRANSIENT_FAILURE = 0xA700

Send = Callable[[DestinationSettings, str, Sequence[Path], Callable[[ObjectStatus], None]], None]


@dataclass(frozen=True)
class Waiting:
    destination: str
    retry_in: float
    reason: str


@dataclass(frozen=True)
class Report:
    """Where a job's delivery stands after one pass over the destinations."""

    delivered: list[str] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)  # "export to <name>: why"
    warnings: list[str] = field(default_factory=list)

    def merged(self, other: Report) -> Report:
        """This pass and `other`'s (over other destinations) as one."""
        return Report(
            self.delivered + other.delivered,
            self.waiting + other.waiting,
            self.gave_up + other.gave_up,
            self.warnings + other.warnings,
        )


def send_by_kind(
    dest: DestinationSettings,
    calling_ae: str,
    files: Sequence[Path],
    record: Callable[[ObjectStatus], None],
) -> None:
    """C-STORE to a dimse destination, STOW-RS to a dicomweb one."""
    sender = stow.send if dest.kind == "dicomweb" else dimse.send
    sender(dest, calling_ae, files, record)


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """The wait after the `attempt`-th failure (1-based): base * 2^(n-1), capped, with jitter.

    The wait is drawn from the upper half of the exponential step, so that workers which
    failed together (a PACS restart) do not come back together.
    """
    step = min(cap, base * 2 ** max(0, attempt - 1))
    return rng.uniform(step / 2, step)


def object_name(sop_class_uid: str) -> str:
    name = UID(sop_class_uid).name
    return name.removesuffix(" Storage") if name != sop_class_uid else sop_class_uid


class Outbox:
    def __init__(
        self,
        deliveries: Deliveries,
        calling_ae: str,
        *,
        send: Send | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._deliveries = deliveries
        self._calling_ae = calling_ae
        self._send = send or send_by_kind
        self._rng = rng or random.Random()
        self._clock = clock

    def deliver(
        self,
        job_id: str,
        files: Sequence[Path],
        destinations: Sequence[DestinationSettings],
        *,
        study: str = "",
    ) -> Report:
        """One pass over the destinations; `study` (the study key) goes to the audit trail."""
        report = Report()
        for destination in destinations:
            self._deliver_to(job_id, files, destination, report, study)
        return report

    def _deliver_to(
        self,
        job_id: str,
        files: Sequence[Path],
        dest: DestinationSettings,
        report: Report,
        study: str,
    ) -> None:
        name = dest.name
        delivery = self._deliveries.begin(job_id, name, len(files))
        stored = self._deliveries.stored(job_id, name)
        todo = [path for path in files if path.stem not in stored]
        if not todo:
            report.delivered.append(name)
            return
        now = self._clock()
        deadline = delivery.first_attempt_at + timedelta(hours=dest.give_up_after_hours)
        if now >= deadline:
            report.gave_up.append(_gave_up(dest, delivery))
            return
        failures, open_until = self._deliveries.breaker(name)
        if failures >= dest.breaker_failures and not (
            now >= open_until and self._deliveries.claim_probe(name, now, PROBE_HOLD)
        ):
            wait = _within(deadline, now, max(1.0, (open_until - now).total_seconds()))
            report.waiting.append(
                Waiting(name, wait, f"{name} unreachable ({failures} failures in a row), waiting")
            )
            return

        answers: list[ObjectStatus] = []

        def record(outcome: ObjectStatus) -> None:
            self._deliveries.record(job_id, name, outcome)
            answers.append(outcome)

        failure: RetryableError | stow.DestinationRefused | None = None
        try:
            self._send(dest, self._calling_ae, todo, record)
        except (RetryableError, stow.DestinationRefused) as exc:
            failure = exc
        _audit(dest, study, todo, answers)
        if isinstance(failure, RetryableError):
            retry_after = failure.retry_after if isinstance(failure, stow.RetryLater) else None
            self._failed(job_id, dest, str(failure), deadline, report, retry_after)
            return
        if failure is not None:
            # It answered, and said no in a way that trying again cannot change (401, 413, ...).
            self._refused(job_id, name, str(failure), report)
            return
        refused = [a for a in answers if not a.stored]
        for answer in answers:
            if answer.stored and answer.status:
                note = (
                    f"{name} stored {object_name(answer.sop_class_uid)} with warning "
                    f"{dimse.describe_status(answer.status)}"
                )
                log.warning("%s", note)
                report.warnings.append(note)
        if not refused:
            self._deliveries.attempted(job_id, name)
            self._deliveries.succeeded(name)
            log.info("sent %d objects to %s", len(todo), name)
            report.delivered.append(name)
            return
        first = refused[0]
        why = (
            f"C-STORE of {object_name(first.sop_class_uid)} refused with "
            f"{dimse.describe_status(first.status)}"
            + (f": {first.comment}" if first.comment else "")
        )
        if (first.status & 0xFF00) == TRANSIENT_FAILURE:
            self._failed(job_id, dest, f"destination {name}: {why}", deadline, report)
            return
        # The destination answered, and will not take this object: trying again cannot help.
        self._refused(job_id, name, why, report)

    def _refused(self, job_id: str, name: str, why: str, report: Report) -> None:
        """The destination is up (its breaker closes) and has refused for good: give up."""
        self._deliveries.attempted(job_id, name, why)
        self._deliveries.succeeded(name)
        report.gave_up.append(f"export to {name}: {why}")

    def _failed(
        self,
        job_id: str,
        dest: DestinationSettings,
        error: str,
        deadline: datetime,
        report: Report,
        retry_after: float | None = None,
    ) -> None:
        name = dest.name
        attempts = self._deliveries.attempted(job_id, name, error)

        def open_for(failures: int) -> float | None:
            if failures < dest.breaker_failures:
                return None
            step = failures - dest.breaker_failures + 1
            return backoff(
                step, dest.retry_backoff_seconds, dest.retry_backoff_max_seconds, self._rng
            )

        failures = self._deliveries.failed(name, error, open_for)
        now = self._clock()
        if now >= deadline:
            delivery = self._deliveries.begin(job_id, name)
            report.gave_up.append(_gave_up(dest, delivery))
            return
        wait = backoff(
            attempts, dest.retry_backoff_seconds, dest.retry_backoff_max_seconds, self._rng
        )
        if retry_after is not None:  # the server said when (HTTP 429 or 503 Retry-After)
            wait = max(wait, retry_after)
        wait = _within(deadline, now, wait)
        if failures >= dest.breaker_failures:
            log.warning("export: %s failed %d times in a row; circuit open", name, failures)
        report.waiting.append(Waiting(name, wait, error))


def _within(deadline: datetime, now: datetime, wait: float) -> float:
    """`wait`, cut short at the ceiling: the last attempt is made at the ceiling, not after it."""
    return min(wait, max(1.0, (deadline - now).total_seconds()))


def _audit(
    dest: DestinationSettings, study: str, sent: Sequence[Path], answers: Sequence[ObjectStatus]
) -> None:
    audit.objects_exported(
        dest.name,
        study,
        len(sent),
        Counter(a.status for a in answers),
        peer=audit.Peer(dest.ae_title, dest.host or dest.url, dest.port),
        objects=[object_name(a.sop_class_uid) for a in answers],
    )


def _gave_up(dest: DestinationSettings, delivery: DeliveryView) -> str:
    return (
        f"export to {dest.name}: gave up after {_duration(dest.give_up_after_hours)} "
        f"({delivery.attempts} attempt{'' if delivery.attempts == 1 else 's'}): "
        f"{delivery.last_error or 'no answer'}"
    )


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds >= 3600:
        return f"{hours:.3g} h"
    return f"{seconds / 60:.3g} min" if seconds >= 60 else f"{seconds:.3g} s"
