"""A step run again and again in a daemon thread of its own, until stopped.

Background loops (the assembler, the retention sweep, each source's poller) share this, and
with it the one place where a background step's unexpected failure is caught: the thread logs
it with its traceback and runs the step again after a pause, instead of dying without a word
while the service looks healthy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Run `step` every `interval` seconds (0: again at once); after a failure, wait `pause`."""

    def __init__(
        self, name: str, step: Callable[[], object], interval: float, pause: float | None = None
    ) -> None:
        self.name = name
        self._step = step
        self._interval = interval
        self._pause = interval if pause is None else pause
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception:  # the background thread's boundary: log it, and go on
                log.exception("%s failed; trying again in %.0f s", self.name, self._pause)
                self.stopping.wait(self._pause)
                continue
            if self._interval:
                self.stopping.wait(self._interval)
