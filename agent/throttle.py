"""Rate limit for repeated records: the first per key per interval, then a count of the rest.

A flood (a port scan, a peer retrying without pause, a process out of file descriptors) can
repeat the same log line or audit record thousands of times a second. `Throttle` lets the
first one per key through, counts the others, and hands the count to the next one let through
after the interval, so that nothing is lost but the repetition. `RepeatFilter` applies it to
log records that match a predicate.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

MonotonicClock = Callable[[], float]

# Keys remembered at most; past it the rest share one key, so that a flood from many
# addresses cannot grow the table without bound either.
MAX_KEYS = 4096
OTHER = "other"


@dataclass
class _Entry:
    since: float
    suppressed: int = 0


class Throttle:
    """Decides, per key, whether an event is written now: once per `interval` seconds.

    `admit` returns None for an event to drop (it is counted), or the number of events of
    that key dropped since the last one admitted. Thread-safe.
    """

    def __init__(
        self,
        interval: float,
        *,
        clock: MonotonicClock = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()

    def admit(self, key: Hashable) -> int | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None and len(self._entries) >= self._max_keys:
                self._forget(now)
                if len(self._entries) >= self._max_keys:
                    key = OTHER
                    entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(since=now)
                return 0
            if now - entry.since < self.interval:
                entry.suppressed += 1
                return None
            suppressed = entry.suppressed
            self._entries[key] = _Entry(since=now)
            return suppressed

    def pending(self) -> dict[Hashable, int]:
        """Keys with dropped events not yet reported, and how many; they are reset."""
        with self._lock:
            found = {key: e.suppressed for key, e in self._entries.items() if e.suppressed}
            self._entries.clear()
            return found

    def _forget(self, now: float) -> None:
        """Drop the keys whose interval is over and that have nothing to report."""
        for key, entry in list(self._entries.items()):
            if not entry.suppressed and now - entry.since >= self.interval:
                del self._entries[key]


def out_of_descriptors(record: logging.LogRecord) -> bool:
    """Whether a log record is about the process (or system) running out of file descriptors."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    return "Too many open files" in record.getMessage()


class RepeatFilter(logging.Filter):
    """Lets through one matching record per logger and interval; the next one let through
    says how many were left out. Records that do not match pass untouched."""

    def __init__(
        self,
        matches: Callable[[logging.LogRecord], bool] = out_of_descriptors,
        interval: float = 60.0,
        *,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        super().__init__()
        self._matches = matches
        self._throttle = Throttle(interval, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._matches(record):
            return True
        suppressed = self._throttle.admit(record.name)
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} more like it left out before this)"
            record.args = None
        return True
