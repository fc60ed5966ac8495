"""The rate limit for repeated log lines and audit records, with an injected clock."""

from __future__ import annotations

import errno
import io
import logging

from agent.throttle import OTHER, RepeatFilter, Throttle


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_per_key_and_interval_then_the_count() -> None:
    clock = _Clock()
    throttle = Throttle(60.0, clock=clock)
    assert throttle.admit("a") == 0
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("b") == 0
    clock.now = 61.0
    assert throttle.admit("a") == 5
    assert throttle.admit("a") is None
    assert throttle.pending() == {"a": 1}


def test_keys_past_the_table_size_share_one() -> None:
    clock = _Clock()
    throttle = Throttle(60.0, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        throttle.admit(key)
    assert throttle.admit("d") == 0  # the first of the rest, under OTHER
    assert throttle.admit("e") is None
    assert throttle.pending() == {OTHER: 1}


def test_out_of_descriptors_is_logged_once_per_interval_with_a_count() -> None:
    clock = _Clock()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter(interval=60.0, clock=clock))
    logger = logging.getLogger("tests.throttle.accept")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        emfile = OSError(errno.EMFILE, "Too many open files")
        for _ in range(1000):
            logger.error("socket.accept() out of system resource", exc_info=emfile)
        logger.error("something else")
        clock.now = 60.0
        logger.error("accept failed: [Errno 24] Too many open files")
    finally:
        logger.removeHandler(handler)
    lines = [
        line
        for line in stream.getvalue().splitlines()
        if not line.startswith((" ", "OSError", "Traceback"))
    ]
    assert lines == [
        "socket.accept() out of system resource",
        "something else",
        "accept failed: [Errno 24] Too many open files (999 more like it left out before this)",
    ]
