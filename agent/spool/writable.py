"""Can the spool be written right now? A small file created and removed in its tmp folder.

Free space says nothing of a filesystem remounted read-only after an I/O error, or of a
folder whose owner or permissions changed: every C-STORE would fail with 0xA700 while the
health probe said `spool: ok`. Writing is the only test that covers both.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.spool.measured import Measured, MonotonicClock

# Measured at most this often, as the free-space watermark: a probe per health request would
# let a stranger make the service create files as fast as it can ask.
CACHE_SECONDS = 1.0

WriteProbe = Callable[[Path], None]


def create_and_remove(folder: Path) -> None:
    """Create, write, sync and remove a small file in `folder`; OSError when it cannot."""
    path = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


class SpoolWritable:
    """Says whether `folder` (the spool's tmp) takes a new file: None, or why not (strerror).

    The answer is cached for `cache_seconds` on the monotonic clock; thread-safe.
    """

    def __init__(
        self,
        folder: Path,
        *,
        probe: WriteProbe = create_and_remove,
        clock: MonotonicClock = time.monotonic,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self._folder = folder
        self._probe = probe
        # "" for writable: the cache keeps a value, and None is its "not measured yet".
        self._answer = Measured(self._measure, seconds=cache_seconds, clock=clock)

    def problem(self) -> str | None:
        return self._answer.get() or None

    def _measure(self) -> str:
        try:
            self._probe(self._folder)
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        return ""
