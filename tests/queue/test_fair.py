"""The queue cycle alone: urgent first, a normal job after `burst` urgent ones, families in turn."""

from __future__ import annotations

import pytest

from agent.domain import Priority
from agent.queue.fair import UrgentFirst
from agent.queue.routing import consumed_queues, queue_for


def _drain(cycle: UrgentFirst, backlog: dict[str, list[str]]) -> list[str]:
    """Take messages as a broker would: from the first non-empty queue the cycle lists."""
    taken = []
    while any(backlog.values()):
        queue = next(q for q in cycle.consume(len(backlog)) if backlog[q])
        taken.append(backlog[queue].pop(0))
        cycle.rotate(queue)
    return taken


def test_urgent_first_then_one_normal_after_each_burst() -> None:
    cycle = UrgentFirst(burst=3)
    cycle.update(["gpu", "gpu.urgent"])  # the order consumers start in does not matter
    assert cycle.consume(2) == ["gpu.urgent", "gpu"]
    backlog = {"gpu": [f"n{i}" for i in range(6)], "gpu.urgent": [f"u{i}" for i in range(6)]}
    assert _drain(cycle, backlog) == [
        *("u0", "u1", "u2", "n0"),
        *("u3", "u4", "u5", "n1"),
        *("n2", "n3", "n4", "n5"),
    ]


def test_the_streak_holds_until_a_normal_job_is_taken() -> None:
    cycle = UrgentFirst(burst=2)
    cycle.update(["gpu.urgent", "gpu"])
    for _ in range(5):  # no normal job waiting: urgent ones keep going
        cycle.rotate("gpu.urgent")
    assert cycle.consume(2) == ["gpu", "gpu.urgent"]  # one arriving now goes next
    cycle.rotate("gpu")
    assert cycle.consume(2) == ["gpu.urgent", "gpu"]


def test_burst_of_one_alternates() -> None:
    cycle = UrgentFirst(burst=1)
    cycle.update(["gpu.urgent", "gpu"])
    backlog = {"gpu": ["n0", "n1", "n2"], "gpu.urgent": ["u0", "u1", "u2", "u3"]}
    assert _drain(cycle, backlog) == ["u0", "n0", "u1", "n1", "u2", "n2", "u3"]


def test_families_take_turns_and_keep_their_own_streaks() -> None:
    cycle = UrgentFirst(burst=3)
    cycle.update(consumed_queues("all"))
    assert cycle.consume(4) == ["gpu.urgent", "gpu", "io.urgent", "io"]
    cycle.rotate("gpu.urgent")  # gpu had its turn: io goes first now
    assert cycle.consume(4) == ["io.urgent", "io", "gpu.urgent", "gpu"]
    cycle.rotate("io")
    cycle.rotate("gpu.urgent")
    cycle.rotate("gpu.urgent")  # a third urgent gpu job in a row
    assert cycle.consume(4) == ["io.urgent", "io", "gpu", "gpu.urgent"]
    # In a worker reading both, a backlog of one family does not hold up the other.
    backlog = {
        "gpu": [],
        "gpu.urgent": ["g0", "g1", "g2"],
        "io": ["e0", "e1"],
        "io.urgent": [],
    }
    assert _drain(cycle, backlog) == ["e0", "g0", "e1", "g1", "g2"]


def test_consumers_coming_and_going_keep_the_state() -> None:
    cycle = UrgentFirst(burst=2)
    cycle.update(["gpu.urgent", "gpu"])
    cycle.rotate("gpu.urgent")
    cycle.rotate("gpu.urgent")
    cycle.update(["gpu.urgent", "gpu", "io"])
    assert cycle.consume(3) == ["gpu", "gpu.urgent", "io"]
    cycle.update(["io"])
    assert cycle.consume(3) == ["io"]
    cycle.rotate("elsewhere")  # a queue it does not list changes nothing
    assert cycle.consume(1) == ["io"]


def test_burst_must_be_positive() -> None:
    with pytest.raises(ValueError, match="burst"):
        UrgentFirst(burst=0)


def test_routing_names() -> None:
    assert queue_for("gpu", Priority.URGENT) == "gpu.urgent"
    assert queue_for("io", Priority.NORMAL) == "io"
    assert consumed_queues("gpu") == ["gpu.urgent", "gpu"]
    assert consumed_queues("io") == ["io.urgent", "io"]
    assert consumed_queues("all") == ["gpu.urgent", "gpu", "io.urgent", "io"]
