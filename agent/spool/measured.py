"""A value measured again at most once a period: a check cheap enough for every C-STORE."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

MonotonicClock = Callable[[], float]


class Measured(Generic[T]):
    """`measure()`'s last answer, measured again once it is `seconds` old (monotonic clock).

    Shared by every receiver thread: one thread measures while the others wait for its answer,
    so a burst of requests makes one measurement, not one each.
    """

    def __init__(self, measure: Callable[[], T], *, seconds: float, clock: MonotonicClock) -> None:
        self._measure = measure
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._expires: float | None = None

    def get(self) -> T:
        with self._lock:
            now = self._clock()
            if self._expires is None or now >= self._expires or self._value is None:
                self._value = self._measure()
                self._expires = now + self._seconds
            return self._value
