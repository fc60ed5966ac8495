"""Urgent before normal, normal never starved: a real Celery worker taking jobs from a real
broker, Redis and the in-memory one, with the app `create_app` builds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import TestWorkController
from celery.worker import state as worker_state

from agent.queue.app import create_app
from agent.queue.routing import consumed_queues
from agent.settings import QueueSettings, Settings

RECORD = "tests.record"


@contextmanager
def running_worker(app: Celery, queues: list[str]) -> Iterator[None]:
    """A worker as `pacs-agent worker` runs one (solo pool, one task at a time), in a thread.

    Celery's own test worker, without its start_worker(): that one also sets up process-wide
    logging and warning filters, which would outlive this test.
    """
    # The worker runs tasks of the process's default app, as `pacs-agent worker` makes its own.
    app.set_default()
    worker: Any = TestWorkController(
        app=app,
        pool="solo",
        concurrency=1,
        queues=queues,
        hostname="order-test@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="WARNING",
        ready_callback=None,
    )
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    worker.ensure_started()
    try:
        yield
    finally:
        # How Celery's test worker is stopped: the consumer loop checks this between messages.
        worker_state.should_terminate = 0
        thread.join(20)
        worker_state.should_terminate = None
        assert not thread.is_alive(), "the worker did not stop"


def _order(broker_url: str, burst: int, normal: int, urgent: int) -> list[str]:
    """Queue `normal` then `urgent` jobs while no worker runs, then let one worker take all."""
    settings = Settings(queue=QueueSettings(broker_url=broker_url, urgent_burst=burst))
    app = create_app(settings, lambda: pytest.fail("the pipeline is not used here"))
    taken: list[str] = []
    done = threading.Event()

    @app.task(name=RECORD, shared=False)
    def record(tag: str) -> None:
        taken.append(tag)
        if len(taken) == normal + urgent:
            done.set()

    queues = consumed_queues("gpu")
    with app.connection_for_write() as conn:
        for queue in queues:  # the in-memory queues are process-wide: start empty
            conn.default_channel.queue_purge(queue)
    for i in range(normal):
        app.send_task(RECORD, args=[f"n{i}"], queue="gpu")
    for i in range(urgent):
        app.send_task(RECORD, args=[f"u{i}"], queue="gpu.urgent")
    with running_worker(app, queues):
        assert done.wait(30), f"only {taken} were processed"
    return taken


def _check(taken: list[str], burst: int, normal: int, urgent: int) -> None:
    everything = [f"n{i}" for i in range(normal)] + [f"u{i}" for i in range(urgent)]
    assert sorted(taken) == sorted(everything)  # every job ran, once
    assert taken[0] == "u0"  # urgent first, though queued last
    for kind in "nu":  # each queue in its own order
        mine = [t for t in taken if t[0] == kind]
        assert mine == sorted(mine, key=lambda t: int(t[1:]))
    run = 0
    for position, tag in enumerate(taken):
        normal_waiting = any(t[0] == "n" for t in taken[position:])
        run = run + 1 if tag[0] == "u" else 0
        if normal_waiting:
            assert run <= burst, f"{run} urgent jobs in a row while a normal one waited: {taken}"


@pytest.fixture(params=["memory", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


def test_urgent_jobs_go_first_but_never_starve_normal_ones(broker_url: str) -> None:
    taken = _order(broker_url, burst=3, normal=6, urgent=6)
    _check(taken, burst=3, normal=6, urgent=6)
    assert taken == ["u0", "u1", "u2", "n0", "u3", "u4", "u5", "n1", "n2", "n3", "n4", "n5"]


def test_a_burst_of_one_alternates(broker_url: str) -> None:
    taken = _order(broker_url, burst=1, normal=3, urgent=5)
    _check(taken, burst=1, normal=3, urgent=5)
    assert taken == ["u0", "n0", "u1", "n1", "u2", "n2", "u3", "u4"]
