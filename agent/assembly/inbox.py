"""The assembler's inbox: what receiver threads report, kept until the database has recorded it.

An acknowledged instance is on disk before it is reported here, but the database is what the
assembler seals from. A batch taken out therefore stays here until `recorded()` says the
database took it: a database that fails (PostgreSQL restarting, a full SQLite disk) loses
nothing, and the same batch, with whatever arrived meanwhile, is offered again. Until then the
study has unrecorded news and is not sealed.

The inbox also keeps, per study, when things happened on the monotonic clock: its last
arrival, when it opened, when its delivery was last interrupted. The quiet period is measured
from these, so that a step of the wall clock (NTP) never seals a study early.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

from agent.db.values import ArrivedInstance, Interruption, SenderNews

# A batch is gathered for at most this long; the quiet period is measured from each
# instance's own arrival, so batching does not delay it.
BATCH_SECONDS = 0.5
BATCH_MAX = 2000


class Inbox:
    """Thread-safe: receiver threads `put`; the assembler's thread alone takes and records."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._queue: queue.Queue[SenderNews] = queue.Queue()
        self._lock = threading.Lock()
        self._unrecorded: Counter[str] = Counter()
        self._pending: list[SenderNews] = []
        self._last_arrival: dict[str, float] = {}
        self._opened: dict[str, float] = {}
        self._interrupted: dict[str, float] = {}

    def put(self, news: SenderNews) -> None:
        with self._lock:
            uid = news.study_uid
            self._unrecorded[uid] += 1
            now = self._monotonic()
            if isinstance(news, ArrivedInstance):
                self._last_arrival[uid] = now
                self._opened.setdefault(uid, now)
            elif isinstance(news, Interruption):
                self._interrupted[uid] = now
        self._queue.put(news)

    def take(self, wait: float = 0.0) -> list[SenderNews]:
        """Everything not yet recorded: the batch a failed recording left, and what arrived.

        With `wait`, block for the first news when there is none, then keep gathering for up
        to BATCH_SECONDS, so that a study arriving at full speed costs a few transactions.
        """
        fresh: list[SenderNews] = []
        try:
            first = wait if wait and not self._pending else 0.0
            fresh.append(self._queue.get(timeout=first) if first else self._queue.get_nowait())
            deadline = time.monotonic() + (BATCH_SECONDS if wait else 0.0)
            while len(self._pending) + len(fresh) < BATCH_MAX:
                remaining = deadline - time.monotonic()
                fresh.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
        except queue.Empty:
            pass
        self._pending += fresh
        return list(self._pending)

    def recorded(self) -> None:
        """The database has recorded the batch `take` returned."""
        with self._lock:
            self._unrecorded.subtract(n.study_uid for n in self._pending)
            self._unrecorded = +self._unrecorded  # drop the studies at zero
        self._pending = []

    def unrecorded(self, study_uid: str) -> bool:
        """Whether news of the study waits to be recorded (a study is not sealed then)."""
        with self._lock:
            return self._unrecorded[study_uid] > 0

    def last_arrival(self, study_uid: str) -> float | None:
        with self._lock:
            return self._last_arrival.get(study_uid)

    def opened(self, study_uid: str, otherwise: float) -> float:
        """When the study's first instance since it was last sealed arrived; `otherwise`
        (kept from now on) for a study this process has not heard arrive."""
        with self._lock:
            return self._opened.setdefault(study_uid, otherwise)

    def interrupted(self, study_uid: str, otherwise: float) -> float:
        """When the study's delivery was last interrupted; `otherwise` (kept from now on)
        for an interruption the database remembers from before this process started."""
        with self._lock:
            return self._interrupted.setdefault(study_uid, otherwise)

    def sealed(self, study_uid: str) -> None:
        """Forget the study's times: its next instance opens it anew."""
        with self._lock:
            for times in (self._last_arrival, self._opened, self._interrupted):
                times.pop(study_uid, None)
