"""The count check: a quiet study is sealed once its sender's archive lists as many instances.

A sender that also stores to an archive (a source) lets a pushed study be sealed before its
quiet period ends: when the archive's NumberOfStudyRelatedInstances equals what is here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from agent.db.database import Database
from agent.db.schema import Study
from agent.logs import log_context

log = logging.getLogger(__name__)

# Why a study was sealed, as its `complete` transition records it.
COUNTS_MATCHED = "counts matched"


class SourceCounts(Protocol):
    """Asks the archive a sender also stores to how many instances a study has there."""

    def expected(self, study_uid: str, calling_ae_title: str) -> tuple[str, int] | None:
        """(source name, NumberOfStudyRelatedInstances), or None when no source verifies
        this sender, the source lacks the study or cannot be asked now. Never raises."""


@dataclass
class _CountCheck:
    """When a quiet study is next asked about, for its current silence."""

    last_arrival: float  # monotonic
    due_after: float
    sender: str | None = None


class CountCheck:
    """Asks `counts` about each quiet study after `verify_after` quiet seconds, then after
    twice and four times as long and so on: a few questions per silence, never one per tick.

    Runs on the assembler's thread, which alone calls it.
    """

    def __init__(self, db: Database, counts: SourceCounts, verify_after: float) -> None:
        self._db = db
        self._counts = counts
        self._verify_after = verify_after
        self._checks: dict[str, _CountCheck] = {}

    def keep_only(self, receiving: Iterable[Study]) -> None:
        """Forget the checks of studies no longer receiving."""
        self._checks = {
            s.study_uid: self._checks[s.study_uid] for s in receiving if s.study_uid in self._checks
        }

    def matched(self, study: Study, last: float, now: float) -> str | None:
        """ "counts matched (...)" when the study's source lists as many instances as we hold;
        `last` (its last arrival) and `now` on the assembler's monotonic clock."""
        check = self._checks.get(study.study_uid)
        if check is None or check.last_arrival != last:
            sender = check.sender if check is not None else None
            check = _CountCheck(last, self._verify_after, sender)
            self._checks[study.study_uid] = check
        if now - last < check.due_after:
            return None
        check.due_after *= 2
        if check.sender is None:
            check.sender = study_sender(self._db, study)
        if not check.sender:
            return None
        with log_context(study=study.study_key):
            answer = self._counts.expected(study.study_uid, check.sender)
            if answer is None:
                return None
            source, expected = answer
            if study.instance_count != expected:
                log.info(
                    "%d of the %d instances %s holds are here; waiting",
                    study.instance_count,
                    expected,
                    source,
                )
                return None
        return f"{COUNTS_MATCHED} ({study.instance_count} of {expected} at {source})"


def study_sender(db: Database, study: Study) -> str:
    """The calling AE title the receiver recorded in one of the study's files ("": none)."""
    for path in db.instance_paths(study.id):
        try:
            meta = read_file_meta_info(path)
        except (OSError, InvalidDicomError, ValueError):
            continue
        return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
    return ""
