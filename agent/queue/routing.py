"""Queue names: a gpu and an io queue, each with an urgent twin; which one a job goes to, and
which ones a worker reads."""

from __future__ import annotations

from agent.domain import Priority

GPU = "gpu"
IO = "io"
URGENT_SUFFIX = ".urgent"


def queue_for(base: str, priority: Priority) -> str:
    """The queue of `base` (gpu or io) for a job of this priority: `gpu` or `gpu.urgent`."""
    return base + URGENT_SUFFIX if priority is Priority.URGENT else base


def consumed_queues(role: str) -> list[str]:
    """What a worker for `role` (gpu, io or all) reads: each urgent twin with its queue."""
    bases = [GPU, IO] if role == "all" else [role]
    return [queue for base in bases for queue in (base + URGENT_SUFFIX, base)]


def is_urgent(queue: str) -> bool:
    return queue.endswith(URGENT_SUFFIX)


def family(queue: str) -> str:
    """The queue an urgent twin belongs to (`gpu.urgent` -> `gpu`); a queue is its own."""
    return queue.removesuffix(URGENT_SUFFIX)
