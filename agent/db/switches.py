"""Model switches: the run-time overrides of `pacs-agent models on|pause|off`, and each model's
effective state (its override, else its configured `state`).

The override lives in the database, not the configuration file, so that the receiver and every
worker see a kill switch at their next decision, without a restart. The table holds a row per
overridden model, a handful at most: reading it whole is the cheap query each decision makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast, get_args

from sqlalchemy import delete, select
from sqlalchemy.engine import CursorResult

from agent.db.database import Database, utcnow
from agent.db.schema import ModelSwitch
from agent.settings import ModelSettings, ModelState

STATES: tuple[ModelState, ...] = get_args(ModelState)
# The reason a study waiting for a paused model is queued with; the assembler sends its job once
# every model of it is on again.
HELD = "held:"


def switched_off(name: str) -> str:
    """Why a model is not run: its kill switch."""
    return f"model {name} is switched off"


def in_state(
    models: Iterable[str], states: Mapping[str, ModelState], state: ModelState
) -> list[str]:
    """Those of `models` whose effective state (`states`) is `state`, in their order."""
    return [m for m in models if states.get(m) == state]


def held(paused: Sequence[str]) -> str:
    """Why a study waits: the paused models among its job's."""
    if len(paused) == 1:
        return f"{HELD} model {paused[0]} is paused"
    return f"{HELD} models {', '.join(paused)} are paused"


class ModelSwitches:
    """The `model_switch` table of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def overrides(self) -> dict[str, ModelState]:
        """Every stored override, by model name."""
        with self._db.session() as s:
            rows = s.execute(select(ModelSwitch.name, ModelSwitch.state)).all()
        # A state this version does not know (written by a newer one) is no override.
        return {name: state for name, state in rows if state in STATES}

    def effective(self, models: Iterable[ModelSettings]) -> dict[str, ModelState]:
        """Each configured model's state now: its override if one is stored, else its `state`."""
        overrides = self.overrides()
        return {m.name: overrides.get(m.name, m.state) for m in models}

    def set(self, name: str, state: ModelState) -> None:
        """Store (or replace) the override of one model."""
        with self._db.session() as s, s.begin():
            row = s.get(ModelSwitch, name, with_for_update=True)
            if row is None:
                row = ModelSwitch(name=name)
                s.add(row)
            row.state = state
            row.changed_at = utcnow()

    def reset(self, name: str) -> bool:
        """Remove one model's override (its configured state applies again); False if none."""
        with self._db.session() as s, s.begin():
            removed = s.execute(delete(ModelSwitch).where(ModelSwitch.name == name))
            return cast(CursorResult[Any], removed).rowcount > 0
