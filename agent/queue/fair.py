"""Urgent first, normal never starved: the order in which a worker takes its queues, the same
on the Redis broker and on the in-memory one.

A worker takes one message at a time (prefetch 1, late acks), and before each one its channel
asks a queue cycle which queues to try, in order:

- Redis: kombu's channel builds `cycle_by_name(queue_order_strategy)()` from the transport
  options, BRPOPs the keys in the order `consume()` gives (the first non-empty one wins) and
  calls `rotate(queue)` with the queue the message came from.
- memory://: kombu's virtual channel has no such option; it tries its queues in turn from
  where it last stopped (a FairCycle). `MemoryTransport` gives it a channel that asks the same
  cycle, in the same way, instead (see `_Channel._poll`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from queue import Empty
from typing import Any

from kombu.transport import memory
from kombu.utils.scheduling import cycle_by_name

from agent.queue.routing import family, is_urgent


class UrgentFirst:
    """A kombu queue cycle (`update`, `consume`, `rotate`): urgent queues before their normal
    twins, but after `burst` urgent messages in a row the normal twin goes first once.

    Queues are grouped in families (`gpu` with `gpu.urgent`, `io` with `io.urgent`). The
    families take turns, as kombu's default round robin has every queue do, so that in a worker
    reading both an `io` backlog does not wait for the `gpu` queues to run dry, nor the other
    way round. Within a family the urgent queue is listed first; a run of `burst` urgent
    messages lists the normal queue first until it gives a message. When the normal queue is
    empty the urgent one still goes: the limit is how long a waiting normal job waits.
    """

    def __init__(self, burst: int = 3) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._burst = burst
        self._queues: list[str] = []
        self._families: list[str] = []  # in turn order: the one served last is at the end
        self._streak: dict[str, int] = {}  # urgent messages in a row, per family

    def update(self, queues: Iterable[str]) -> None:
        """The queues consumed now (kombu calls this when a consumer starts or stops)."""
        self._queues = list(dict.fromkeys(queues))
        present = list(dict.fromkeys(family(q) for q in self._queues))
        self._families = [f for f in self._families if f in present] + [
            f for f in present if f not in self._families
        ]
        self._streak = {f: self._streak.get(f, 0) for f in self._families}

    def consume(self, n: int) -> list[str]:
        """The first `n` queues to try for the next message, best first."""
        order: list[str] = []
        for name in self._families:
            members = [q for q in self._queues if family(q) == name]
            urgent = [q for q in members if is_urgent(q)]
            normal = [q for q in members if not is_urgent(q)]
            if self._streak[name] >= self._burst:
                order += normal + urgent
            else:
                order += urgent + normal
        return order[:n]

    def rotate(self, last_used: str) -> str:
        """A message came from `last_used`: its family's turn ends, its streak moves."""
        name = family(last_used)
        if name in self._families:
            self._families.remove(name)
            self._families.append(name)
            self._streak[name] = self._streak[name] + 1 if is_urgent(last_used) else 0
        return last_used

    def close(self) -> None:
        """Nothing to release (kombu's cycles have this too)."""


def urgent_first(burst: int) -> Callable[[], UrgentFirst]:
    """What the `queue_order_strategy` transport option takes: kombu calls it for a new cycle
    per channel (a non-string strategy is used as it is, not looked up by name)."""
    return functools.partial(UrgentFirst, burst)


class _Channel(memory.Channel):
    """The in-memory channel, taking its queues in the order the queue cycle gives.

    kombu's virtual channel polls through `_poll(cycle, callback)`, its hook for a transport
    that chooses among queues itself; this one chooses as the Redis channel does for BRPOP.
    The rest (the global in-memory queues, acks, restores) is the in-memory transport's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # The option Redis's channel reads; by default the same round robin as there.
        options = self.connection.client.transport_options
        strategy = options.get("queue_order_strategy", "round_robin")
        self._queue_cycle = cycle_by_name(strategy)()  # type: ignore[no-untyped-call]

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        ret = super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]
        self._queue_cycle.update(self._active_queues)
        return ret

    def basic_cancel(self, consumer_tag: str) -> Any:
        ret = super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]
        self._queue_cycle.update(self._active_queues)
        return ret

    def _poll(self, cycle: Any, callback: Callable[..., Any], timeout: float | None = None) -> Any:
        for queue in self._queue_cycle.consume(len(self._active_queues)):
            try:
                message = self._get(queue)  # type: ignore[no-untyped-call]
            except Empty:
                continue
            self._queue_cycle.rotate(queue)
            return callback(message, queue)
        raise Empty()


class MemoryTransport(memory.Transport):
    """kombu's in-memory transport with `_Channel`; Celery takes it as `broker_transport`."""

    Channel = _Channel
