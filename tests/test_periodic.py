"""The background loop: a failing step is logged and run again, never ends the thread."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from agent.periodic import Periodic


def test_a_failing_step_is_logged_and_run_again_until_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []
    third = threading.Event()

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database hiccup")
        if len(calls) == 3:
            third.set()

    loop = Periodic("sweep", step, interval=0.01, pause=0.01)
    with caplog.at_level(logging.ERROR, logger="agent.periodic"):
        loop.start()
        assert third.wait(10), "the loop stopped after the failure"
        loop.stop()
    assert "sweep failed; trying again in 0 s" in caplog.text
    assert "RuntimeError: database hiccup" in caplog.text
    stopped_at = len(calls)
    time.sleep(0.1)
    assert len(calls) == stopped_at  # nothing runs after stop
