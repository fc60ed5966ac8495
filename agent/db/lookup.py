"""Finding a study by what an operator knows of it, and reading its state changes as they come.

An operator has a study key from a log line or `status`, or a Study Instance UID or an
accession number from the PACS or the RIS. The last two are looked up by their digests (the
study key is the UID's), so that the database holds neither and no answer repeats them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.sql.elements import ColumnElement

from agent.db.database import Database, as_utc
from agent.db.schema import Study, Transition
from agent.db.states import State
from agent.errors import AgentError
from agent.logs import accession_digest, study_key

_KEY_PREFIX = re.compile(r"[0-9a-f]{6,16}")


class StudyNotFound(AgentError):
    """No study, or more than one, is named by what the operator gave (which is not repeated:
    it may be a UID or an accession number)."""


@dataclass(frozen=True)
class Step:
    """One state change of a study: its row id (changes are read in this order), the state
    entered, why, and when."""

    id: int
    state: State
    reason: str
    at: datetime


def find_study(db: Database, given: str) -> Study:
    """The one study whose key (or a key's first 6+ characters), Study Instance UID or
    accession number is `given`; StudyNotFound when none or several are."""
    given = given.strip()
    matches: list[ColumnElement[bool]] = [Study.study_key == study_key(given)]
    if _KEY_PREFIX.fullmatch(given):
        matches.append(Study.study_key.startswith(given))
    accession = accession_digest(given)
    if accession:
        matches.append(Study.accession_hash == accession)
    with db.session() as s:
        found = list(s.scalars(select(Study).where(or_(*matches)).order_by(Study.id).limit(11)))
    if not found:
        raise StudyNotFound(
            "no study has that key, Study Instance UID or accession number "
            "(a key needs at least 6 characters)"
        )
    if len(found) > 10:
        raise StudyNotFound("more than 10 studies match; give a study key")
    if len(found) > 1:
        keys = ", ".join(st.study_key for st in found)
        raise StudyNotFound(f"{len(found)} studies match: {keys}; give one key")
    return found[0]


def steps_after(db: Database, study_id: int, after: int = 0) -> list[Step]:
    """The study's state changes recorded after the one with id `after`, oldest first."""
    with db.session() as s:
        rows = s.execute(
            select(Transition.id, Transition.state, Transition.reason, Transition.at)
            .where(Transition.study_id == study_id, Transition.id > after)
            .order_by(Transition.id)
        ).all()
    return [
        Step(int(i), State(state), str(reason or ""), as_utc(at)) for i, state, reason, at in rows
    ]
