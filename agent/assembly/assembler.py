"""The assembler thread: records arrivals, decides when to seal a study, sends or holds its job."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.assembly.counts import CountCheck, SourceCounts
from agent.assembly.policy import Clock, is_complete
from agent.assembly.sealing import PULLED_FROM, Sealer
from agent.db.database import Database
from agent.db.leases import Leases
from agent.db.schema import Study
from agent.db.states import IN_FLIGHT, InvalidTransition, State, Superseded
from agent.db.switches import HELD, ModelSwitches, held, in_state
from agent.db.values import ArrivedInstance
from agent.domain import Manifest
from agent.errors import RetryableError
from agent.logs import log_context
from agent.periodic import Periodic
from agent.settings import ModelSettings
from agent.spool.layout import SpoolLayout
from agent.spool.scanner import clear_partial_writes, unknown_instances

log = logging.getLogger(__name__)

Enqueue = Callable[[str, Path], None]
WAITING_FOR_BROKER = "waiting for broker"
# Set by `pacs-agent retry` on a failed study; the running service sends its job again.
RETRY_REQUESTED = "retry requested"
# Why a study was sealed, as its `complete` transition records it (or COUNTS_MATCHED, counts.py).
QUIET_PERIOD = "quiet period"
# Arrivals are written to the database in batches gathered for at most this long; the quiet
# period is measured from each instance's own arrival time, so batching does not delay it.
BATCH_SECONDS = 0.5
BATCH_MAX = 2000


class Assembler:
    """Owns every write of arrivals and of receiving -> complete -> queued (through a `Sealer`).

    The receiver only puts arrivals on an in-memory queue, so a C-STORE never waits on the
    database; the spool scan at start recovers anything acknowledged but not yet recorded.
    A pull records its own arrivals (as `pacs-agent retry` makes its own transitions) and
    marks the study "pulled from <source>", which is sealed here at once.

    With `counts`, a study pushed by a sender that a source verifies is sealed as soon as its
    instance count equals the source's, asked after `verify_after` quiet seconds, then after
    twice and four times as long and so on: a few questions per silence, never one per tick.

    A study from one of `urgent_senders` (calling AE title globs), or taken by an urgent model,
    gets an urgent job. A model switched off takes nothing; a job with a paused model is held,
    queued but not sent, until every model of it is on again (`retry_waiting`).
    """

    def __init__(
        self,
        db: Database,
        layout: SpoolLayout,
        *,
        quiet_seconds: float,
        models: tuple[ModelSettings, ...],
        enqueue: Enqueue,
        clock: Clock,
        tick_seconds: float | None = None,
        stale_after: float | None = None,
        counts: SourceCounts | None = None,
        verify_after: float = 2.0,
        urgent_senders: Sequence[str] = (),
    ) -> None:
        self._db = db
        self._layout = layout
        self._quiet = quiet_seconds
        self._models = models
        self._enqueue = enqueue
        self._clock = clock
        self._tick = tick_seconds if tick_seconds is not None else min(1.0, quiet_seconds / 4)
        self._stale_after = stale_after
        self._counts = CountCheck(db, counts, verify_after) if counts is not None else None
        self._switches = ModelSwitches(db)
        self._sealer = Sealer(db, layout, models, self._switches, tuple(urgent_senders))
        # The models of each job waiting in `queued`, read once from its manifest.
        self._job_models: dict[str, tuple[str, ...]] = {}
        # When this process last sent each in-flight job again, so it waits `stale_after` anew.
        self._resent: dict[str, datetime] = {}
        # The quiet period counts only while this process listens (see `resume`).
        self._resumed_at: datetime | None = None
        self._inbox: queue.Queue[ArrivedInstance] = queue.Queue()
        # drain() itself waits up to a tick for arrivals, so the loop runs again at once.
        self._loop = Periodic("assembler", self._iteration, interval=0, pause=self._tick)

    # -- called from receiver threads ---------------------------------------------------------

    def submit(self, arrival: ArrivedInstance) -> None:
        self._inbox.put(arrival)

    # -- lifecycle ------------------------------------------------------------------------------

    def resume(self, *, requeue_in_flight: bool) -> None:
        """Recover after a stop or crash: nothing acknowledged is forgotten.

        With an in-process broker every queued message died with the process, so jobs in flight
        are sent again; with Redis they are still there (acks_late), and only `queued` studies,
        whose message may never have been sent, are sent again (a duplicate is harmless).
        """
        # A crash cut the associations of any study still arriving, and its senders re-send;
        # the time the agent was down is no silence, so those studies get a full quiet period
        # rather than being sealed at once with part of their instances.
        self._resumed_at = self._clock.now()
        stray = clear_partial_writes(self._layout)
        if stray:
            log.info("removed %d partial writes that were never acknowledged", stray)
        found = list(unknown_instances(self._layout, self._db.known_paths()))
        if found:
            log.info("recovered %d spooled instances missing from the database", len(found))
            self._db.record_arrivals(found)
        states = IN_FLIGHT if requeue_in_flight else frozenset({State.QUEUED})
        for study in self._db.in_states(states):
            # A held job is sent by the loop, once its models are on (`retry_waiting`).
            if study.job_id is not None and not study.reason.startswith(HELD):
                self._send(study.study_uid, study.study_key, study.job_id)
                self._resent[study.job_id] = self._resumed_at
        for study in self._db.in_states([State.COMPLETE]):
            self._seal(study)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        self.drain()

    def _iteration(self) -> None:
        self.drain(wait=self._tick)
        self.seal_quiet_studies()
        self.retry_waiting()
        self.requeue_stale()

    # -- one step each (also called directly by tests) ------------------------------------------

    def drain(self, wait: float = 0.0) -> int:
        """Record queued arrivals in one transaction; returns how many.

        With `wait`, block for the first arrival, then keep gathering for up to BATCH_SECONDS
        so that a study arriving at full speed costs a few transactions, not one per instance.
        """
        batch: list[ArrivedInstance] = []
        try:
            batch.append(self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait())
            deadline = time.monotonic() + (BATCH_SECONDS if wait else 0.0)
            while len(batch) < BATCH_MAX:
                remaining = deadline - time.monotonic()
                batch.append(
                    self._inbox.get(timeout=remaining)
                    if remaining > 0
                    else self._inbox.get_nowait()
                )
        except queue.Empty:
            pass
        if batch:
            self._db.record_arrivals(batch)
        return len(batch)

    def seal_quiet_studies(self) -> None:
        now = self._clock.now()
        receiving = self._db.in_states([State.RECEIVING])
        if self._counts is not None:
            self._counts.keep_only(receiving)
        for study in receiving:
            if study.reason.startswith(PULLED_FROM):
                self._seal(study, study.reason.split(":", 1)[0])
                continue
            last = _utc(study.last_arrival)
            if self._resumed_at is not None:
                last = max(last, self._resumed_at)
            if is_complete(last, now, self._quiet):
                self._seal(study, QUIET_PERIOD)
            elif self._counts is not None:
                matched = self._counts.matched(study, last, now)
                if matched is not None:
                    self._seal(study, matched)

    def retry_waiting(self) -> None:
        """Send the queued jobs that wait: for the broker, for `pacs-agent retry`, or (held) for
        a paused model, once all of theirs are on; one that is to wait for a model is held."""
        waiting = [
            study
            for study in self._db.in_states([State.QUEUED])
            if study.reason.startswith((WAITING_FOR_BROKER, RETRY_REQUESTED, HELD))
            and study.job_id is not None
        ]
        jobs = {str(study.job_id) for study in waiting}
        self._job_models = {j: m for j, m in self._job_models.items() if j in jobs}
        if not waiting:
            return
        states = self._switches.effective(self._models)
        for study in waiting:
            job_id = str(study.job_id)
            waits_for = in_state(self._models_of(job_id), states, "paused")
            if waits_for:
                self._hold(study, job_id, held(waits_for))
            elif self._send(study.study_uid, study.study_key, job_id):
                # A worker may already have moved it on.
                with contextlib.suppress(InvalidTransition, Superseded):
                    self._db.transition(
                        study.study_uid,
                        State.QUEUED,
                        "sent to broker",
                        expect_job=study.job_id,
                        expect_state=[State.QUEUED],
                    )

    def requeue_stale(self) -> None:
        """Send again the job of every in-flight study whose worker is gone or whose state has
        not moved for too long.

        A task holds its job's lease while it runs (agent/queue/lease.py): a lease that has
        expired means its worker died mid-task (killed, out of memory, a GPU reset, the node
        lost), and the job is sent again at once, once per lease. A live lease is never
        overruled, however long the inference takes. Without a lease (the job waits in the
        broker, or never reached it) `stale_after` is the backstop: a Redis that keeps nothing
        on disk forgets its queued messages when it restarts. Tasks ignore a job that is
        superseded, has ended or is leased by a live worker, and output UIDs are deterministic,
        so a second delivery costs time, never a duplicate.
        """
        if self._stale_after is None:
            return
        now = self._clock.now()
        stuck = [
            s
            for s in self._db.in_states(IN_FLIGHT)
            if s.job_id is not None and not s.reason.startswith((WAITING_FOR_BROKER, HELD))
        ]
        self._resent = {s.job_id: self._resent[s.job_id] for s in stuck if s.job_id in self._resent}
        expiries = Leases(self._db).expiries(str(s.job_id) for s in stuck)
        for study in stuck:
            job_id = str(study.job_id)
            expires = expiries.get(job_id)
            if expires is not None and expires > now:
                continue  # a live worker runs it
            resent = self._resent.get(job_id)
            if expires is not None and (resent is None or resent < expires):
                why = f"its worker stopped {(now - expires).total_seconds():.0f} s ago"
            else:
                since = max(_utc(study.updated_at), resent or _utc(study.updated_at))
                if now - since < timedelta(seconds=self._stale_after):
                    continue
                stuck_for = (now - _utc(study.updated_at)).total_seconds()
                why = f"stuck {study.state} for {stuck_for:.0f} s"
            self._resent[job_id] = now  # sent or not, wait a full period before the next try
            with log_context(study=study.study_key, job=job_id):
                log.warning("study %s %s: sending its job again", study.study_key, why)
                try:
                    self._enqueue(job_id, self._layout.manifest_path(job_id))
                except RetryableError as exc:
                    log.warning("cannot enqueue yet: %s", exc)

    def _seal(self, study: Study, why: str = "") -> None:
        with log_context(study=study.study_key):
            job = self._sealer.seal(study, why)
            if job is None:
                return
            if job.waits_for:
                self._job_models[job.job_id] = job.models
                log.info("study %s", held(job.waits_for))
                return
            self._send(study.study_uid, study.study_key, job.job_id)

    def _send(self, study_uid: str, key: str, job_id: str) -> bool:
        with log_context(study=key, job=job_id):
            try:
                self._enqueue(job_id, self._layout.manifest_path(job_id))
            except RetryableError as exc:
                log.warning("cannot enqueue yet: %s", exc)
                if not self._db_reason_is_waiting(study_uid):
                    self._db.transition(
                        study_uid,
                        State.QUEUED,
                        f"{WAITING_FOR_BROKER}: {exc}",
                        expect_job=job_id,
                        expect_state=[State.QUEUED],
                    )
                return False
            return True

    def _hold(self, study: Study, job_id: str, reason: str) -> None:
        """Keep a queued job from the broker while a model of it is paused, saying so once."""
        if study.reason == reason:
            return
        with (
            log_context(study=study.study_key, job=job_id),
            contextlib.suppress(InvalidTransition, Superseded),
        ):
            self._db.transition(
                study.study_uid,
                State.QUEUED,
                reason,
                expect_job=job_id,
                expect_state=[State.QUEUED],
            )
            log.info("study %s", reason)

    def _models_of(self, job_id: str) -> tuple[str, ...]:
        """The models of a job, from its manifest (read once); none when it cannot be read,
        and then the job is sent and the worker, reading it in turn, decides."""
        if job_id not in self._job_models:
            try:
                manifest = Manifest.from_json(self._layout.manifest_path(job_id).read_text())
                self._job_models[job_id] = manifest.models
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("job %s: manifest unreadable (%s)", job_id, type(exc).__name__)
                self._job_models[job_id] = ()
        return self._job_models[job_id]

    def _db_reason_is_waiting(self, study_uid: str) -> bool:
        study = self._db.get(study_uid)
        return study is not None and study.reason.startswith(WAITING_FOR_BROKER)


def _utc(value: datetime) -> datetime:
    """A database timestamp as an aware UTC datetime (SQLite gives it back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
