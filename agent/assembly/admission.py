"""What becomes of a sealed study's job: its models' switches (off, paused) and its priority."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from agent.assembly.rules import ModelChoice
from agent.db.switches import switched_off
from agent.domain import ModelInput, Priority
from agent.settings import ModelSettings, ModelState


def without_switched_off(
    choices: Sequence[ModelChoice], states: Mapping[str, ModelState]
) -> list[ModelChoice]:
    """The choices, with every model switched off taking nothing, for that reason."""
    return [
        ModelChoice(c.model, None, switched_off(c.model), c.verdicts)
        if states.get(c.model) == "off"
        else c
        for c in choices
    ]


def study_priority(
    inputs: Sequence[ModelInput],
    models: Sequence[ModelSettings],
    sender: str,
    urgent_senders: Sequence[str],
) -> tuple[Priority, str]:
    """Urgent when the calling AE title matches one of `urgent_senders` (case-insensitive
    globs) or a model that takes the study is urgent; with why, for the log ("" if normal)."""
    if sender:
        for pattern in urgent_senders:
            if fnmatch.fnmatchcase(sender.upper(), pattern.upper()):
                return Priority.URGENT, f"sender {sender}"
    urgent = {m.name for m in models if m.priority == "urgent"}
    names = [i.model for i in inputs if i.model in urgent]
    if names:
        return Priority.URGENT, f"model {', '.join(names)}"
    return Priority.NORMAL, ""
