"""Thin Celery tasks: parse the payload, call one pipeline function, map errors to states."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from agent import pipeline
from agent.db.states import State, Superseded
from agent.errors import JobHeld, PermanentError, RetryableError, StudySkipped
from agent.pipeline import ExportFailed, ExportPending, PipelineContext
from agent.settings import QueueSettings, Settings

log = logging.getLogger(__name__)


def backoff_seconds(retries: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped."""
    return float(min(cap, base * (2**retries)))


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
    pipeline.note_retry(
        ctx, job_id, step, f"retrying in {countdown:.0f} s (attempt {attempt}): {exc}"
    )
    raise task.retry(countdown=countdown, max_retries=q.max_retries) from exc


def register_tasks(app: Celery, settings: Settings, context: Callable[[], PipelineContext]) -> None:
    from agent.queue.app import EXPORT, INFER
    from agent.queue.routing import IO, queue_for

    q = settings.queue

    # shared=False: a shared task is also given to every app created later in the process.
    @app.task(name=INFER, bind=True, acks_late=True, max_retries=q.max_retries, shared=False)
    def infer(self: Task[Any, Any], job_id: str) -> None:
        ctx = context()
        try:
            priority = pipeline.infer(ctx, job_id)
        except Superseded:
            log.info("job %s superseded or already finished", job_id)
            return
        except JobHeld as held:
            # Acknowledged, not retried: the assembler sends the job again once it may run.
            pipeline.hold(ctx, job_id, held.reason)
            return
        except StudySkipped as skip:
            pipeline.end(ctx, job_id, State.SKIPPED, skip.reason)
            return
        except RetryableError as exc:
            _retry_or_fail(self, ctx, q, job_id, State.INFERRING, exc)
            return
        except PermanentError as exc:
            pipeline.end(ctx, job_id, State.FAILED, f"inference: {exc}")
            return
        except Exception as exc:  # the task boundary: a named state, never a silent drop
            log.exception("inference crashed")
            pipeline.end(
                ctx, job_id, State.FAILED, f"inference: internal error {type(exc).__name__}"
            )
            return
        # An urgent study's export is urgent too, on the io worker.
        export_queue = queue_for(IO, priority)
        self.app.send_task(EXPORT, args=[job_id], queue=export_queue)

    # No retry count: each destination's ceiling (give_up_after_hours) ends an export.
    @app.task(name=EXPORT, bind=True, acks_late=True, max_retries=None, shared=False)
    def export(self: Task[Any, Any], job_id: str) -> None:
        ctx = context()
        try:
            pipeline.export(ctx, job_id)
        except Superseded:
            log.info("job %s superseded or already finished", job_id)
        except StudySkipped as skip:  # every model of the job switched off since its inference
            pipeline.end(ctx, job_id, State.SKIPPED, skip.reason)
        except ExportPending as exc:
            # Held as an ETA message: keep it under the broker's redelivery timeout.
            countdown = min(exc.retry_in, float(q.task_time_limit_seconds))
            pipeline.note_retry(
                ctx, job_id, State.EXPORTING, f"retrying in {countdown:.1f} s: {exc}"
            )
            raise self.retry(countdown=countdown, max_retries=None) from exc
        except ExportFailed as exc:
            pipeline.end(ctx, job_id, State.FAILED, str(exc))
        except RetryableError as exc:  # a step before sending (manifest, encoding)
            _retry_or_fail(self, ctx, q, job_id, State.EXPORTING, exc)
        except PermanentError as exc:
            pipeline.end(ctx, job_id, State.FAILED, f"export: {exc}")
        except Exception as exc:  # the task boundary
            log.exception("export crashed")
            pipeline.end(ctx, job_id, State.FAILED, f"export: internal error {type(exc).__name__}")
