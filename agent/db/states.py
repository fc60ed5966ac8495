"""The study state machine: the states, which moves between them are allowed, and refusals."""

from __future__ import annotations

import enum

from agent.errors import PermanentError


class State(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    INFERRING = "inferring"
    EXPORTING = "exporting"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.SKIPPED, State.FAILED})
IN_FLIGHT = frozenset({State.QUEUED, State.INFERRING, State.EXPORTING})

# The forward path; any state may also go back to RECEIVING (a new instance arrived, so the
# study is re-assembled under a new job) and any non-terminal state may end SKIPPED or FAILED.
_FORWARD: dict[State, frozenset[State]] = {
    State.RECEIVING: frozenset({State.COMPLETE}),
    # COMPLETE -> DONE: re-opened by a late arrival that left every model's input unchanged.
    State.COMPLETE: frozenset({State.QUEUED, State.DONE}),
    # QUEUED -> QUEUED records that the broker could not take the job yet.
    State.QUEUED: frozenset({State.QUEUED, State.INFERRING}),
    # INFERRING -> INFERRING: a redelivered task (acks_late after a worker died) starts over.
    # INFERRING -> QUEUED: a retried or redelivered job whose model has since been paused waits.
    State.INFERRING: frozenset({State.INFERRING, State.EXPORTING, State.QUEUED}),
    # EXPORTING -> EXPORTING records a retry with its reason.
    State.EXPORTING: frozenset({State.DONE, State.EXPORTING}),
    # `pacs-agent retry`: the failed job is queued again (its results and outbox are reused).
    State.FAILED: frozenset({State.QUEUED}),
}


def allowed(current: State, target: State) -> bool:
    """Whether the state machine permits current -> target."""
    if target is State.RECEIVING:
        return True
    if target in (State.SKIPPED, State.FAILED):
        return current not in TERMINAL
    return target in _FORWARD.get(current, frozenset())


class InvalidTransition(PermanentError):
    pass


class Superseded(PermanentError):
    """The job is no longer the study's current job (new instances arrived); stop quietly."""
