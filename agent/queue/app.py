"""Celery app factory (no module-level app): broker, routing, late acks, prefetch 1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from celery import Celery
from kombu.exceptions import OperationalError

from agent.domain import Manifest, Priority
from agent.errors import RetryableError
from agent.pipeline import PipelineContext
from agent.queue.fair import MemoryTransport, urgent_first
from agent.queue.routing import GPU, IO, queue_for
from agent.settings import Settings

log = logging.getLogger(__name__)

INFER = "pacs_agent.infer"
EXPORT = "pacs_agent.export"
QUEUES = {GPU: INFER, IO: EXPORT}


def create_app(settings: Settings, context: Callable[[], PipelineContext]) -> Celery:
    """A Celery app for these settings; `context` builds the pipeline's dependencies lazily."""
    from agent.queue.tasks import register_tasks  # tasks need the app; the app does not need them

    limit = settings.queue.task_time_limit_seconds
    # kombu warns about a memory:// URL without a host; the host means nothing there.
    broker = "memory://localhost/" if settings.queue.embedded else settings.queue.broker_url
    app = Celery("pacs_agent", broker=broker, set_as_current=False)
    app.conf.update(
        # The in-memory transport with the queue order Redis gets from queue_order_strategy.
        **({"broker_transport": MemoryTransport} if settings.queue.embedded else {}),
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
            # Urgent queues first, a normal job after at most urgent_burst urgent ones in a row.
            "queue_order_strategy": urgent_first(settings.queue.urgent_burst),
        },
        # Normal priority by default; the enqueuer and the infer task name the queue.
        task_routes={INFER: {"queue": GPU}, EXPORT: {"queue": IO}},
        task_default_queue=IO,
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
    """The assembler's way to hand a job to the GPU queue its manifest's priority names;
    RetryableError if the broker is down."""

    def enqueue(job_id: str, manifest_path: Path) -> None:
        queue = queue_for(GPU, _priority(manifest_path))
        try:
            app.send_task(INFER, args=[job_id], queue=queue)
        except (OperationalError, OSError) as exc:
            raise RetryableError(f"broker unavailable ({type(exc).__name__})") from exc

    return enqueue


def _priority(manifest_path: Path) -> Priority:
    """The job's priority; normal when its manifest cannot be read, so that the job still
    reaches a worker, which ends it with the reason (as it would have without priorities)."""
    try:
        return Manifest.from_json(manifest_path.read_text()).priority
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("job manifest unreadable (%s): sent as normal", type(exc).__name__)
        return Priority.NORMAL
