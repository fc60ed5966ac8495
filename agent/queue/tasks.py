"""Thin Celery tasks: parse the payload, call one pipeline function, map errors to states."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry

from agent import pipeline
from agent.db.outage import DB_UNAVAILABLE
from agent.db.states import State, Superseded
from agent.domain import Priority
from agent.errors import JobHeld, PermanentError, RetryableError, StudySkipped
from agent.pipeline import ExportFailed, ExportPending, PipelineContext
from agent.queue.lease import job_lease
from agent.settings import QueueSettings, Settings
from agent.space import WaitingForDisk

log = logging.getLogger(__name__)

# A database that does not answer is asked again this often, as is a disk that was full: the
# study must run again within a minute of the fault going away, and each try costs little.
DATABASE_RETRY_SECONDS = 5.0
DISK_RETRY_SECONDS = 10.0


def backoff_seconds(retries: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped."""
    return float(min(cap, base * (2**retries)))


def next_attempt(countdown: float, attempt: int, now: datetime | None = None) -> str:
    """The note "next attempt at 10:04:17 UTC (attempt 3)": a time, since the study's reason
    is read long after it is written, when a countdown ("in 13.9 s") would be stale. The date
    is given when the attempt falls on another day."""
    now = now or datetime.now(UTC)
    at = now + timedelta(seconds=countdown)
    when = f"{at:%H:%M:%S}" if at.date() == now.date() else f"{at:%Y-%m-%d %H:%M:%S}"
    return f"next attempt at {when} UTC (attempt {attempt})"


def _again(task: Task[Any, Any], countdown: float) -> Retry:
    """Send the task again in `countdown` s without counting an attempt: nothing failed, a
    resource (the database, disk space) was missing. Raise what it returns."""
    task.signature_from_request(countdown=countdown).apply_async()
    return Retry(when=countdown)


def _database_down(task: Task[Any, Any], job_id: str, exc: Exception) -> Retry:
    # Nothing is written (the database is what is missing): the study keeps its state, and
    # the job's lease, if it could not be released, expires by itself.
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    log.warning(
        "job %s: database unavailable (%s); the task runs again in %.0f s",
        job_id,
        first,
        DATABASE_RETRY_SECONDS,
    )
    return _again(task, DATABASE_RETRY_SECONDS)


def _wait_for_disk(
    task: Task[Any, Any], ctx: PipelineContext, job_id: str, step: State, exc: WaitingForDisk
) -> Retry:
    pipeline.note_waiting(ctx, job_id, step, f"waiting for disk space: {exc}")
    return _again(task, DISK_RETRY_SECONDS)


def _retry_or_fail(
    task: Task[Any, Any],
    ctx: PipelineContext,
    q: QueueSettings,
    job_id: str,
    step: State,
    exc: RetryableError,
) -> None:
    """Schedule the step again with backoff, or end the study failed once retries run out."""
    what = "export" if step == State.EXPORTING else "inference"
    attempt = task.request.retries + 1
    if task.request.retries >= q.max_retries:
        pipeline.end(ctx, job_id, State.FAILED, f"{what} gave up after {attempt} attempts: {exc}")
        return
    countdown = backoff_seconds(
        task.request.retries, q.retry_backoff_seconds, q.retry_backoff_max_seconds
    )
    pipeline.note_retry(ctx, job_id, step, f"{next_attempt(countdown, attempt + 1)}: {exc}")
    raise task.retry(countdown=countdown, max_retries=q.max_retries) from exc


def _infer(
    task: Task[Any, Any], ctx: PipelineContext, q: QueueSettings, job_id: str
) -> Priority | None:
    """The job's priority once inferred, None when the study took another turn."""
    try:
        return pipeline.infer(ctx, job_id)
    except Superseded:
        log.info("job %s superseded or already finished", job_id)
    except JobHeld as held:
        # Acknowledged, not retried: the assembler sends the job again once it may run.
        pipeline.hold(ctx, job_id, held.reason)
    except StudySkipped as skip:
        pipeline.end(ctx, job_id, State.SKIPPED, skip.reason)
    except WaitingForDisk as exc:
        raise _wait_for_disk(task, ctx, job_id, State.INFERRING, exc) from exc
    except RetryableError as exc:
        _retry_or_fail(task, ctx, q, job_id, State.INFERRING, exc)
    except PermanentError as exc:
        pipeline.end(ctx, job_id, State.FAILED, f"inference: {exc}")
    except DB_UNAVAILABLE:
        raise  # the task's own: never a failure of the study
    except Exception as exc:  # the task boundary: a named state, never a silent drop
        log.exception("inference crashed")
        pipeline.end(ctx, job_id, State.FAILED, f"inference: internal error {type(exc).__name__}")
    return None


def _export(task: Task[Any, Any], ctx: PipelineContext, q: QueueSettings, job_id: str) -> None:
    try:
        pipeline.export(ctx, job_id)
    except Superseded:
        log.info("job %s superseded or already finished", job_id)
    except StudySkipped as skip:  # every model of the job switched off since its inference
        pipeline.end(ctx, job_id, State.SKIPPED, skip.reason)
    except ExportPending as exc:
        # Held as an ETA message: keep it under the broker's redelivery timeout.
        countdown = min(exc.retry_in, float(q.task_time_limit_seconds))
        attempt = task.request.retries + 2  # the one after this
        note = f"{next_attempt(countdown, attempt)}: {exc}"
        pipeline.note_retry(ctx, job_id, State.EXPORTING, note)
        raise task.retry(countdown=countdown, max_retries=None) from exc
    except ExportFailed as exc:
        pipeline.end(ctx, job_id, State.FAILED, str(exc))
    except WaitingForDisk as exc:
        raise _wait_for_disk(task, ctx, job_id, State.EXPORTING, exc) from exc
    except RetryableError as exc:  # a step before sending (manifest, encoding)
        _retry_or_fail(task, ctx, q, job_id, State.EXPORTING, exc)
    except PermanentError as exc:
        pipeline.end(ctx, job_id, State.FAILED, f"export: {exc}")
    except DB_UNAVAILABLE:
        raise
    except Exception as exc:  # the task boundary
        log.exception("export crashed")
        pipeline.end(ctx, job_id, State.FAILED, f"export: internal error {type(exc).__name__}")


def register_tasks(app: Celery, settings: Settings, context: Callable[[], PipelineContext]) -> None:
    from agent.queue.app import EXPORT, INFER
    from agent.queue.routing import IO, queue_for

    q = settings.queue

    # shared=False: a shared task is also given to every app created later in the process.
    # A worker's shutdown (agent.queue.pool) passes through these tasks as a BaseException:
    # the message stays unacknowledged and the study keeps its state for the next worker.
    @app.task(name=INFER, bind=True, acks_late=True, max_retries=q.max_retries, shared=False)
    def infer(self: Task[Any, Any], job_id: str) -> None:
        ctx = context()
        try:
            with job_lease(ctx.db, job_id, q.lease_seconds) as mine:
                if not mine:
                    log.info(
                        "job %s is running on another worker; this delivery is dropped", job_id
                    )
                    return
                priority = _infer(self, ctx, q, job_id)
        except DB_UNAVAILABLE as exc:
            raise _database_down(self, job_id, exc) from exc
        if priority is not None:
            # An urgent study's export is urgent too, on the io worker. Sent once the lease is
            # given up, so that the export task finds the job free.
            self.app.send_task(EXPORT, args=[job_id], queue=queue_for(IO, priority))

    # No retry count: each destination's ceiling (give_up_after_hours) ends an export.
    @app.task(name=EXPORT, bind=True, acks_late=True, max_retries=None, shared=False)
    def export(self: Task[Any, Any], job_id: str) -> None:
        ctx = context()
        try:
            with job_lease(ctx.db, job_id, q.lease_seconds) as mine:
                if not mine:
                    log.info(
                        "job %s is running on another worker; this delivery is dropped", job_id
                    )
                    return
                _export(self, ctx, q, job_id)
        except DB_UNAVAILABLE as exc:
            raise _database_down(self, job_id, exc) from exc
