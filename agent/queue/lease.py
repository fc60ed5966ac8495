"""A task's hold on its job: the job's lease, taken when the task starts, renewed from a daemon
thread while it runs (a long inference keeps its job), given up when it returns."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator

from agent.db.database import Database
from agent.db.leases import Leases
from agent.db.outage import DB_UNAVAILABLE

log = logging.getLogger(__name__)


def holder_name() -> str:
    """This worker process, as a lease names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Renewer(threading.Thread):
    """Renews one lease every quarter of its length until stopped."""

    def __init__(self, leases: Leases, job_id: str, holder: str, seconds: float) -> None:
        super().__init__(name=f"lease-{job_id[:8]}", daemon=True)
        self._leases, self._job, self._holder, self._seconds = leases, job_id, holder, seconds
        self._halt = threading.Event()

    def run(self) -> None:
        failing = False
        while not self._halt.wait(self._seconds / 4):
            try:
                if not self._leases.renew(self._job, self._holder, self._seconds):
                    log.warning("job %s: lease taken over after it expired", self._job)
                    return
                failing = False
            except DB_UNAVAILABLE as exc:
                if not failing:  # once per outage; the next renewal tries again
                    log.warning(
                        "job %s: lease not renewed, database unavailable (%s)",
                        self._job,
                        type(exc).__name__,
                    )
                failing = True

    def stop(self) -> None:
        self._halt.set()
        self.join()


@contextlib.contextmanager
def job_lease(db: Database, job_id: str, seconds: float) -> Iterator[bool]:
    """Hold the job's lease for the block; yields False (and holds nothing) while another
    worker's live lease holds it, i.e. that worker is running the job now.

    Released when the block ends, normally or with an error; a shutdown interrupting the block
    (a BaseException) expires it instead, so that the assembler sends the job again at once.
    """
    leases, holder = Leases(db), holder_name()
    if not leases.acquire(job_id, holder, seconds):
        yield False
        return
    renewer = _Renewer(leases, job_id, holder, seconds)
    renewer.start()
    interrupted = True
    try:
        yield True
        interrupted = False
    except Exception:
        interrupted = False
        raise
    finally:
        renewer.stop()
        # A database down now: the lease expires by itself and the job is sent again then.
        with contextlib.suppress(*DB_UNAVAILABLE):
            if interrupted:
                leases.expire(job_id, holder)
            else:
                leases.release(job_id, holder)
