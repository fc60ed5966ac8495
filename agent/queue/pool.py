"""The worker's task pool: Celery's solo pool (one task at a time, in the worker's own thread,
so that the model stays loaded), whose cold shutdown stops the running task without ending it."""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.solo import TaskPool
from celery.exceptions import WorkerTerminate

log = logging.getLogger(__name__)

# The exit status of a worker stopped by a cold shutdown (Celery's EX_FAILURE).
COLD_SHUTDOWN_EXIT = 1


class SoloPool(TaskPool):  # type: ignore[misc]
    """A second Ctrl-C (or SIGQUIT) asks Celery to cancel the running task, which the solo
    pool cannot do from outside: the plain pool raises NotImplementedError into the task, which
    then ends its study failed. Here the task is interrupted with WorkerTerminate instead, a
    BaseException that no task boundary catches: the study keeps its state, the message stays
    unacknowledged (late acks), the job's lease is expired, and the job runs again on the next
    worker (the broker redelivers it, or the assembler sends it again)."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        log.warning("cold shutdown: the running task stops here; its job runs again later")
        raise WorkerTerminate(COLD_SHUTDOWN_EXIT)
