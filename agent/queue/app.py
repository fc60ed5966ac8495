"""Celery app factory (no module-level app): broker, routing, late acks, prefetch 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from celery import Celery
from kombu.exceptions import OperationalError

from agent.errors import RetryableError
from agent.pipeline import PipelineContext
from agent.settings import Settings

INFER = "pacs_agent.infer"
EXPORT = "pacs_agent.export"
QUEUES = {"gpu": INFER, "io": EXPORT}


def create_app(settings: Settings, context: Callable[[], PipelineContext]) -> Celery:
    """A Celery app for these settings; `context` builds the pipeline's dependencies lazily."""
    from agent.queue.tasks import register_tasks  # tasks need the app; the app does not need them

    limit = settings.queue.task_time_limit_seconds
    # kombu warns about a memory:// URL without a host; the host means nothing there.
    broker = "memory://localhost/" if settings.queue.embedded else settings.queue.broker_url
    app = Celery("pacs_agent", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        # A worker killed mid-task (OOM, node loss) leaves the message to be redelivered.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=limit,
        # Redis redelivers an unacknowledged message after the visibility timeout: keep it well
        # above the longest task so a slow inference is never run twice at once.
        broker_transport_options={
            "visibility_timeout": settings.queue.visibility_timeout_seconds,
            # The in-memory transport polls (Redis blocks on BRPOP instead); its 1 s default
            # would add up to a second to every hand-over between tasks.
            **({"polling_interval": 0.05} if settings.queue.embedded else {}),
        },
        task_routes={INFER: {"queue": "gpu"}, EXPORT: {"queue": "io"}},
        task_default_queue="io",
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.queue.embedded,
    )
    register_tasks(app, settings, context)
    return app


def enqueuer(app: Celery) -> Callable[[str, Path], None]:
    """The assembler's way to hand a job to the GPU queue; RetryableError if the broker is down."""

    def enqueue(job_id: str, manifest_path: Path) -> None:
        try:
            app.send_task(INFER, args=[job_id], queue="gpu")
        except (OperationalError, OSError) as exc:
            raise RetryableError(f"broker unavailable ({type(exc).__name__})") from exc

    return enqueue
