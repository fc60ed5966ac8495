"""Completeness by count: the source that also holds a sender's studies says how many there are."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from agent.errors import AgentError
from agent.pull.source import StudySource

log = logging.getLogger(__name__)


class CountsBySender:
    """Maps each verified calling AE title to its source, and asks that source (QIDO-RS
    or C-FIND)."""

    def __init__(self, by_sender: Mapping[str, StudySource]) -> None:
        # Leading and trailing spaces of an AE title are not significant (PS3.8 Table 9-11).
        self._by_sender = {ae.strip(): source for ae, source in by_sender.items()}

    def __bool__(self) -> bool:
        return bool(self._by_sender)

    def expected(self, study_uid: str, calling_ae_title: str) -> tuple[str, int] | None:
        source = self._by_sender.get(calling_ae_title.strip())
        if source is None:
            return None
        try:
            count = source.instance_count(study_uid)
        except AgentError as exc:
            # The quiet period still ends the wait; a source that is down only costs the gain.
            # (Both kinds of source name every failure so; anything else is a bug, which the
            # assembler's loop logs with its traceback.)
            log.warning("cannot compare counts with %s: %s", source.name, exc)
            return None
        if count is None:
            log.info("%s does not hold the study (yet); waiting", source.name)
            return None
        return source.name, count
