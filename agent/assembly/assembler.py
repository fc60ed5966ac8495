"""The assembler thread: records arrivals, decides when to seal a study, sends or holds its job."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent.assembly.counts import CountCheck, SourceCounts
from agent.assembly.inbox import Inbox
from agent.assembly.policy import QUIET_PERIOD, Clock, Decision, Interrupted, decide
from agent.assembly.sealing import PULLED_FROM, Sealer
from agent.db.database import Database
from agent.db.leases import Leases
from agent.db.schema import Study
from agent.db.states import IN_FLIGHT, InvalidTransition, State, Superseded
from agent.db.switches import HELD, ModelSwitches, held, in_state
from agent.db.values import ArrivedInstance, CleanSend, Interruption, SenderNews
from agent.dicom.files import DEFAULT_MAX_BYTES
from agent.domain import Manifest
from agent.errors import AgentError, RetryableError
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
__all__ = ["QUIET_PERIOD", "RETRY_REQUESTED", "WAITING_FOR_BROKER", "Assembler", "Enqueue"]
# A study whose sealing failed (the database, the disk) is tried again after this long, twice
# as long after each further failure, up to the cap: back within a minute of the cause going.
SEAL_RETRY_SECONDS = 2.0
SEAL_RETRY_MAX_SECONDS = 30.0
# Leases expired this long, of jobs no longer in flight, are deleted; checked this often.
LEASE_SWEEP_SECONDS = 3600.0


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
        sender_retry_seconds: float = 0.0,
        max_wait_seconds: float | None = None,
        max_instance_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._db = db
        self._layout = layout
        self._quiet = quiet_seconds
        self._sender_retry = sender_retry_seconds
        self._max_wait = max_wait_seconds
        self._models = models
        self._enqueue = enqueue
        self._clock = clock
        self._tick = tick_seconds if tick_seconds is not None else min(1.0, quiet_seconds / 4)
        self._stale_after = stale_after
        self._counts = CountCheck(db, counts, verify_after) if counts is not None else None
        self._switches = ModelSwitches(db)
        # The receiver's limit bounds every header this process reads back from the spool, so
        # that no stored file (one an older version let in) inflates past it here.
        self._max_bytes = max_instance_bytes
        self._sealer = Sealer(
            db, layout, models, self._switches, tuple(urgent_senders), max_instance_bytes
        )
        # The models of each job waiting in `queued`, read once from its manifest.
        self._job_models: dict[str, tuple[str, ...]] = {}
        # When this process last sent each in-flight job again, so it waits `stale_after` anew.
        self._resent: dict[str, datetime] = {}
        # The quiet period counts only while this process listens (see `resume`): monotonic.
        self._resumed_at: float | None = None
        self._inbox = Inbox(clock.monotonic)
        # Since when the database has refused the inbox's batch (monotonic), to say so once.
        self._db_down_since: float | None = None
        # A study whose sealing failed: when to try again (monotonic) and the delay after that.
        self._seal_retry: dict[str, tuple[float, float]] = {}
        # When this process last deleted old leases (monotonic); None: not yet.
        self._leases_swept: float | None = None
        # drain() itself waits up to a tick for arrivals, so the loop runs again at once.
        self._loop = Periodic("assembler", self._iteration, interval=0, pause=self._tick)

    # -- called from receiver threads ---------------------------------------------------------

    def submit(self, news: SenderNews) -> None:
        """An instance stored (or an association's outcome): recorded by the loop."""
        self._inbox.put(news)

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
        self._resumed_at = self._clock.monotonic()
        resumed_at = self._clock.now()
        stray = clear_partial_writes(self._layout)
        if stray:
            log.info("removed %d partial writes that were never acknowledged", stray)
        found = list(
            unknown_instances(self._layout, self._db.known_paths(), max_bytes=self._max_bytes)
        )
        if found:
            log.info("recovered %d spooled instances missing from the database", len(found))
            self._db.record_arrivals(found)
        states = IN_FLIGHT if requeue_in_flight else frozenset({State.QUEUED})
        for study in self._db.in_states(states):
            # A held job is sent by the loop, once its models are on (`retry_waiting`).
            if study.job_id is not None and not study.reason.startswith(HELD):
                self._send(study.study_uid, study.study_key, study.job_id)
                self._resent[study.job_id] = resumed_at
        # A stop between sealing and queueing left these `complete`.
        for study in self._db.in_states([State.COMPLETE]):
            self._seal(study)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        with contextlib.suppress(RetryableError):
            self.drain()

    def _iteration(self) -> None:
        try:
            self.drain(wait=self._tick)
        except RetryableError:
            # Nothing is sealed from a database that lacks arrivals; the batch is kept.
            self._loop.stopping.wait(self._tick)
            return
        self.seal_quiet_studies()
        self.retry_waiting()
        self.requeue_stale()

    # -- one step each (also called directly by tests) ------------------------------------------

    def drain(self, wait: float = 0.0) -> int:
        """Record the receivers' news in one transaction; returns how many instances.

        When the database fails, the batch stays in the inbox and RetryableError is raised;
        the next call offers it again with whatever arrived meanwhile. The outage is logged
        once when it begins and once when it ends, not on every try.
        """
        batch = self._inbox.take(wait)
        if not batch:
            return 0
        arrivals = [n for n in batch if isinstance(n, ArrivedInstance)]
        news = [n for n in batch if isinstance(n, Interruption | CleanSend)]
        try:
            self._db.record_arrivals(arrivals, news)
        except SQLAlchemyError as exc:
            if self._db_down_since is None:
                self._db_down_since = self._clock.monotonic()
                log.error(
                    "database unavailable (%s): %d arrivals kept in memory until it answers",
                    describe(exc),
                    len(arrivals),
                )
            raise RetryableError("database unavailable") from exc
        self._inbox.recorded()
        if self._db_down_since is not None:
            log.warning(
                "database available again after %.0f s: %d arrivals recorded",
                self._clock.monotonic() - self._db_down_since,
                len(arrivals),
            )
            self._db_down_since = None
        return len(arrivals)

    def seal_quiet_studies(self) -> None:
        """Seal each receiving study the policy calls complete; seal again each study that
        a failure (the database, the disk) left `complete`."""
        now = self._clock.monotonic()
        wall = self._clock.now()
        studies = self._db.in_states([State.RECEIVING, State.COMPLETE])
        receiving = [s for s in studies if s.state == State.RECEIVING]
        if self._counts is not None:
            self._counts.keep_only(receiving)
        for study in studies:
            if study.state == State.COMPLETE:
                self._seal(study)
            elif study.reason.startswith(PULLED_FROM):
                self._seal(study, study.reason.split(":", 1)[0])
            elif not self._inbox.unrecorded(study.study_uid):
                self._decide(study, now, wall)

    def _decide(self, study: Study, now: float, wall: datetime) -> None:
        """Seal a receiving study, or say what it waits for, as the policy decides."""
        uid = study.study_uid
        last = self._inbox.last_arrival(uid)
        if last is None:  # recorded by another process (a pull), or before this one started
            last = now - (wall - _utc(study.last_arrival)).total_seconds()
        if self._resumed_at is not None:
            last = max(last, self._resumed_at)
        interrupted = None
        if study.interruption:
            before = self._resumed_at if self._resumed_at is not None else now
            since = self._inbox.interrupted(uid, otherwise=before)
            interrupted = Interrupted(since, study.interruption)
        decision = decide(
            now,
            last_arrival=last,
            opened=self._inbox.opened(uid, otherwise=last),
            quiet_seconds=self._quiet,
            interrupted=interrupted,
            sender_retry_seconds=self._sender_retry,
            max_wait_seconds=self._max_wait,
        )
        if decision.seal:
            self._seal(study, decision.why)
        elif decision.waiting:
            self._say_waiting(study, decision)
        elif self._counts is not None:
            matched = self._counts.matched(study, last, now)
            if matched is not None:
                self._seal(study, matched)

    def _say_waiting(self, study: Study, decision: Decision) -> None:
        """Put what a receiving study waits for in its state's reason, once."""
        if study.reason == decision.waiting:
            return
        with log_context(study=study.study_key), contextlib.suppress(InvalidTransition):
            self._db.transition(
                study.study_uid, State.RECEIVING, decision.waiting, expect_state=[State.RECEIVING]
            )
            log.warning("study %s", decision.waiting)

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
        leases = Leases(self._db)
        expiries = leases.expiries(str(s.job_id) for s in stuck)
        self._forget_old_leases(leases, now, [str(s.job_id) for s in stuck])
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

    def _forget_old_leases(self, leases: Leases, now: datetime, in_flight: list[str]) -> None:
        """Now and then, delete leases long expired whose jobs are no longer in flight."""
        mono = self._clock.monotonic()
        if self._leases_swept is not None and mono - self._leases_swept < LEASE_SWEEP_SECONDS:
            return
        self._leases_swept = mono
        gone = leases.forget_expired(now - timedelta(seconds=LEASE_SWEEP_SECONDS), in_flight)
        if gone:
            log.info("forgot %d expired leases of jobs no longer in flight", gone)

    def _seal(self, study: Study, why: str = "") -> None:
        """Seal the study and send (or hold) its job. A failure of the database or the disk
        leaves it receiving or complete, and it is tried again after a pause that grows."""
        uid = study.study_uid
        now = self._clock.monotonic()
        due, delay = self._seal_retry.get(uid, (now, SEAL_RETRY_SECONDS))
        if now < due:
            return
        with log_context(study=study.study_key):
            try:
                job = self._sealer.seal(study, why)
            except (SQLAlchemyError, OSError, AgentError) as exc:
                log.warning(
                    "study %s: sealing interrupted (%s); trying again in %.0f s",
                    study.study_key,
                    describe(exc),
                    delay,
                )
                self._seal_retry[uid] = (now + delay, min(2 * delay, SEAL_RETRY_MAX_SECONDS))
                return
            self._seal_retry.pop(uid, None)
            self._inbox.sealed(uid)
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


def describe(exc: BaseException) -> str:
    """An error in words fit for a log line: no library's class names, no values."""
    if isinstance(exc, SQLAlchemyError):
        return "database error"
    if isinstance(exc, OSError):
        return exc.strerror or "input/output error"
    return str(exc)


def _utc(value: datetime) -> datetime:
    """A database timestamp as an aware UTC datetime (SQLite gives it back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
