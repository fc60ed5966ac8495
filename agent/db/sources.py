"""What each source's poller has seen, kept across restarts: pulled, known, or failed and due."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.db.database import Database, as_utc, utcnow
from agent.db.schema import SourceStudy, SourceWatch

PULLED, BASELINE, KNOWN, FAILED = "pulled", "baseline", "known", "failed"


class SeenStudies:
    """The `source_watch` and `source_study` tables, for one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def watched(self, source: str) -> bool:
        """Whether the source has been searched before (its baseline is set)."""
        with self._db.session() as s:
            return s.get(SourceWatch, source) is not None

    def begin_watch(self, source: str, baseline: Iterable[str]) -> None:
        """Start watching: the studies in `baseline` (already in the archive) are not pulled."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            if s.get(SourceWatch, source) is not None:
                return
            s.add(SourceWatch(source=source, since=now))
            for study_uid in set(baseline):
                _upsert(s, source, study_uid, BASELINE, now)

    def due(self, source: str, study_uids: Iterable[str], now: datetime | None = None) -> list[str]:
        """Those of `study_uids` still to pull: never seen, or failed and due again."""
        now = now or utcnow()
        wanted = list(dict.fromkeys(study_uids))
        with self._db.session() as s:
            rows = {
                row.study_uid: row
                for row in s.scalars(
                    select(SourceStudy).where(
                        SourceStudy.source == source, SourceStudy.study_uid.in_(wanted)
                    )
                )
            }
        return [
            uid
            for uid in wanted
            if uid not in rows
            or (rows[uid].outcome == FAILED and as_utc(rows[uid].next_attempt_at) <= now)
        ]

    def settle(self, source: str, study_uid: str, outcome: str) -> None:
        """Record that a study is done with: pulled, or known already (never pulled again)."""
        with self._db.session() as s, s.begin():
            _upsert(s, source, study_uid, outcome, utcnow())

    def failed(
        self, source: str, study_uid: str, error: str, *, backoff: float, backoff_max: float
    ) -> tuple[int, float]:
        """Record a failed pull; it is due again after a doubling backoff. Returns the number
        of attempts so far and the seconds until the next one."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            row = _upsert(s, source, study_uid, FAILED, now)
            row.attempts += 1
            delay = min(backoff_max, backoff * 2 ** (row.attempts - 1))
            row.next_attempt_at = now + timedelta(seconds=delay)
            row.last_error = error[:2000]
            return row.attempts, delay

    def outcome(self, source: str, study_uid: str) -> SourceStudy | None:
        with self._db.session() as s:
            return s.scalar(
                select(SourceStudy).where(
                    SourceStudy.source == source, SourceStudy.study_uid == study_uid
                )
            )


def _upsert(s: Session, source: str, study_uid: str, outcome: str, now: datetime) -> SourceStudy:
    row = s.scalar(
        select(SourceStudy)
        .where(SourceStudy.source == source, SourceStudy.study_uid == study_uid)
        .with_for_update()
    )
    if row is None:
        row = SourceStudy(
            source=source,
            study_uid=study_uid,
            outcome=outcome,
            attempts=0,
            next_attempt_at=now,
            last_error="",
            updated_at=now,
        )
        s.add(row)
    row.outcome = outcome
    row.updated_at = now
    return row
