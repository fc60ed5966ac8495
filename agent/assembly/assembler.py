"""The assembler thread: records arrivals, seals quiet studies, writes manifests, enqueues jobs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from agent.assembly.admission import paused, study_priority, without_switched_off
from agent.assembly.policy import Clock, is_complete
from agent.assembly.rules import select
from agent.db.database import Database
from agent.db.schema import Study
from agent.db.states import IN_FLIGHT, InvalidTransition, State, Superseded
from agent.db.switches import HELD, ModelSwitches, held
from agent.db.values import ArrivedInstance
from agent.dicom.files import read_header
from agent.domain import Manifest, ModelInput
from agent.errors import PermanentError, RetryableError
from agent.logs import log_context
from agent.periodic import Periodic
from agent.settings import ModelSettings
from agent.spool.layout import SpoolLayout
from agent.spool.scanner import clear_partial_writes, unknown_instances
from agent.spool.writer import write_atomic

log = logging.getLogger(__name__)

Enqueue = Callable[[str, Path], None]
WAITING_FOR_BROKER = "waiting for broker"
# Set by `pacs-agent retry` on a failed study; the running service sends its job again.
RETRY_REQUESTED = "retry requested"
# Set by a pull (`pacs-agent submit`, the poller, the HTTP API) on the study it has retrieved
# whole: sealed at the next tick, and processed even when its input is unchanged.
PULLED_FROM = "pulled from"
# Why a study was sealed, as its `complete` transition records it.
QUIET_PERIOD = "quiet period"
COUNTS_MATCHED = "counts matched"
# Arrivals are written to the database in batches gathered for at most this long; the quiet
# period is measured from each instance's own arrival time, so batching does not delay it.
BATCH_SECONDS = 0.5
BATCH_MAX = 2000


class SourceCounts(Protocol):
    """Asks the archive a sender also stores to how many instances a study has there."""

    def expected(self, study_uid: str, calling_ae_title: str) -> tuple[str, int] | None:
        """(source name, NumberOfStudyRelatedInstances), or None when no source verifies
        this sender, the source lacks the study or cannot be asked now. Never raises."""


@dataclass
class _CountCheck:
    """When a quiet study is next asked about, for its current silence."""

    last_arrival: datetime
    due_after: float
    sender: str | None = None


class Assembler:
    """Owns every write of arrivals and of receiving -> complete -> queued.

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
        self._counts = counts
        self._verify_after = verify_after
        self._urgent_senders = tuple(urgent_senders)
        self._switches = ModelSwitches(db)
        # The models of each job waiting in `queued`, read once from its manifest.
        self._job_models: dict[str, tuple[str, ...]] = {}
        self._checks: dict[str, _CountCheck] = {}
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
        self._checks = {
            s.study_uid: self._checks[s.study_uid] for s in receiving if s.study_uid in self._checks
        }
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
                matched = self._counts_matched(study, last, now)
                if matched is not None:
                    self._seal(study, matched)

    def _counts_matched(self, study: Study, last: datetime, now: datetime) -> str | None:
        """ "counts matched (...)" when the study's source lists as many instances as we hold."""
        assert self._counts is not None
        check = self._checks.get(study.study_uid)
        if check is None or check.last_arrival != last:
            sender = check.sender if check is not None else None
            check = _CountCheck(last, self._verify_after, sender)
            self._checks[study.study_uid] = check
        if (now - last).total_seconds() < check.due_after:
            return None
        check.due_after *= 2
        if check.sender is None:
            check.sender = self._sender(study)
        if not check.sender:
            return None
        with log_context(study=study.study_key):
            answer = self._counts.expected(study.study_uid, check.sender)
            if answer is None:
                return None
            source, expected = answer
            if study.instance_count != expected:
                log.info(
                    "%d of the %d instances %s holds are here; waiting",
                    study.instance_count,
                    expected,
                    source,
                )
                return None
        return f"{COUNTS_MATCHED} ({study.instance_count} of {expected} at {source})"

    def _sender(self, study: Study) -> str:
        """The calling AE title the receiver recorded in one of the study's files ("": none)."""
        for path in self._db.instance_paths(study.id):
            try:
                meta = read_file_meta_info(path)
            except (OSError, InvalidDicomError, ValueError):
                continue
            return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
        return ""

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
            waits_for = paused(self._models_of(job_id), states)
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
        """Send again the job of every in-flight study whose state has not moved for too long.

        A Redis that keeps nothing on disk forgets its queued messages when it restarts, and a
        worker killed mid-task leaves its message unacknowledged until the visibility timeout,
        while every process keeps running. Tasks ignore a job that is superseded or has ended,
        and output UIDs are deterministic, so a second delivery costs time, never a duplicate.
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
        for study in stuck:
            job_id = str(study.job_id)
            since = max(_utc(study.updated_at), self._resent.get(job_id, _utc(study.updated_at)))
            if now - since < timedelta(seconds=self._stale_after):
                continue
            self._resent[job_id] = now  # sent or not, wait a full period before the next try
            with log_context(study=study.study_key, job=job_id):
                log.warning(
                    "study %s stuck %s for %.0f s: sending its job again",
                    study.study_key,
                    study.state,
                    (now - _utc(study.updated_at)).total_seconds(),
                )
                try:
                    self._enqueue(job_id, self._layout.manifest_path(job_id))
                except RetryableError as exc:
                    log.warning("cannot enqueue yet: %s", exc)

    def _seal(self, study: Study, why: str = "") -> None:
        with log_context(study=study.study_key):
            paths = [p for p in self._db.instance_paths(study.id) if p.exists()]
            if study.state == State.RECEIVING:
                count = f"{len(paths)} instances"
                self._db.transition(
                    study.study_uid,
                    State.COMPLETE,
                    f"{why}; {count}" if why else count,
                    expect_state=[State.RECEIVING],
                )
                if why:
                    log.info("study sealed: %s", why)
            headers = _readable_headers(paths)
            states = self._switches.effective(self._models)
            choices = without_switched_off(select(headers, self._models), states)
            inputs = tuple(c.input for c in choices if c.input is not None)
            if not inputs:
                reason = "; ".join(c.reason for c in choices)
                log.info("study skipped: %s", reason)
                self._db.transition(study.study_uid, State.SKIPPED, reason)
                return
            for choice in choices:
                if choice.input is None:
                    log.info("model not run: %s", choice.reason)
            digest = input_digest(inputs, headers)
            # A pull is a request to process: it runs again even with the same input (the
            # same output UIDs, so the PACS keeps one copy of each object).
            if digest == study.done_digest and not why.startswith(PULLED_FROM):
                # Late arrivals outside every model's input (an SR, a re-sent instance):
                # the results already sent stand, and nothing new is produced.
                self._db.transition(
                    study.study_uid,
                    State.DONE,
                    f"input unchanged; results of revision {study.revision} stand",
                    expect_state=[State.COMPLETE],
                )
                log.info("study complete again with an unchanged input; nothing to do")
                return
            revision = study.revision if digest == study.input_digest else study.revision + 1
            revision = max(revision, 1)
            job_id = f"{study.study_key}-{uuid.uuid4().hex[:12]}"
            sender = self._sender(study) if self._urgent_senders else ""
            priority, urgent = study_priority(inputs, self._models, sender, self._urgent_senders)
            manifest = Manifest(job_id, study.study_uid, inputs, revision, priority)
            manifest_path = self._layout.manifest_path(job_id)
            write_atomic(manifest_path, [manifest.to_json().encode()], self._layout.tmp)
            summary = ", ".join(f"{i.model}: {len(i.frames)} slices" for i in inputs)
            if urgent:
                summary += f"; urgent ({urgent})"
            waits_for = paused(manifest.models, states)
            self._db.transition(
                study.study_uid,
                State.QUEUED,
                held(waits_for) if waits_for else summary,
                job_id=job_id,
                expect_state=[State.COMPLETE],
                input_digest=digest,
                revision=revision,
            )
            log.info("study complete: %s, revision %d, job %s", summary, revision, job_id)
            if waits_for:
                self._job_models[job_id] = manifest.models
                log.info("study %s", held(waits_for))
                return
            self._send(study.study_uid, study.study_key, job_id)

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


def input_digest(inputs: Sequence[ModelInput], headers: Mapping[Path, Dataset]) -> str:
    """What the results derive from: each model and the SOP Instances (and frames) it reads.

    Equal digests mean equal output UIDs (agent.dicom.uids), so an equal input is never given
    a new revision number: one SOP Instance UID must not name two different objects.
    """
    digest = hashlib.sha256()
    for item in sorted(inputs, key=lambda i: i.model):
        refs = sorted(f"{headers[f.path].SOPInstanceUID}:{f.index}" for f in item.frames)
        digest.update(json.dumps([item.model, refs]).encode())
    return digest.hexdigest()


def _utc(value: datetime) -> datetime:
    """A database timestamp as an aware UTC datetime (SQLite gives it back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _readable_headers(paths: list[Path]) -> dict[Path, Dataset]:
    """Headers of the study's instances; one that cannot be parsed is left out, with a warning.

    The receiver validates only the identifying elements, so a dataset damaged further on is
    stored (and acknowledged) but cannot be used; it must not block the rest of the study.
    """
    headers: dict[Path, Dataset] = {}
    for path in paths:
        try:
            headers[path] = read_header(path)
        except PermanentError as exc:
            log.warning("instance not usable: %s", exc)
    return headers
