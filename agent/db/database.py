"""Typed access to the study database: arrivals, queries, retention claims, state changes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import create_engine, event, func, insert, select, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from agent.db import schema
from agent.db.schema import Instance, Study, Transition
from agent.db.states import InvalidTransition, State, Superseded, allowed
from agent.db.values import ArrivedInstance, CleanSend, Interruption, StudyStatus
from agent.errors import PermanentError
from agent.logs import study_key

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Database:
    """Typed access to the study tables; every state change goes through `transition`."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables; safe when serve and workers start at the same moment."""
        schema.create_schema(self.engine)

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- arrivals ---------------------------------------------------------------------------

    def record_arrivals(
        self, arrivals: Iterable[ArrivedInstance], news: Iterable[Interruption | CleanSend] = ()
    ) -> list[str]:
        """Store newly spooled instances; reopen a study that had moved on. Returns touched keys.

        One transaction and two queries per study however large the batch: this runs while a
        modality is still sending, and every millisecond here is taken from the receiver.
        `news` of the senders' associations, recorded in the same transaction after the
        arrivals, marks a receiving study interrupted, or clears that after a clean re-send.
        """
        by_study: dict[str, dict[str, ArrivedInstance]] = {}
        for a in arrivals:
            by_study.setdefault(a.study_uid, {})[a.sop_uid] = a  # a re-send keeps the latest
        keys = []
        with self.session() as s, s.begin():
            for study_uid, batch in by_study.items():
                study = self._study_for_arrivals(s, study_uid, batch.values())
                existing = {
                    row.sop_uid: row
                    for row in s.scalars(
                        select(Instance).where(
                            Instance.study_id == study.id, Instance.sop_uid.in_(list(batch))
                        )
                    )
                }
                if not self._without_series_conflicts(study, batch, existing):
                    continue
                fresh = [a for sop, a in batch.items() if sop not in existing]
                if fresh:
                    # A Core executemany, not ORM objects: several times cheaper per row, and
                    # this CPU is taken from the receiver threads while a sender is sending.
                    s.execute(
                        insert(Instance),
                        [
                            {
                                "study_id": study.id,
                                "series_uid": a.series_uid,
                                "sop_uid": a.sop_uid,
                                "sop_class_uid": a.sop_class_uid,
                                "path": str(a.path),
                                "received_at": a.received_at,
                                "digest": a.digest,
                            }
                            for a in fresh
                        ],
                    )
                for sop, row in existing.items():
                    row.path = str(batch[sop].path)
                    row.received_at = batch[sop].received_at
                    # Other content under the same UID: the study's input digest changes with
                    # it, so the study reopened below is processed again, not "unchanged".
                    row.digest = batch[sop].digest
                study.instance_count += len(fresh)
                if not study.accession_hash:
                    study.accession_hash = next(
                        (a.accession_hash for a in batch.values() if a.accession_hash), ""
                    )
                latest = max(a.received_at for a in batch.values())
                study.last_arrival = max(as_utc(study.last_arrival), latest)
                if study.state != State.RECEIVING:
                    # PS3.4 does not say when a study ends; a late instance means the result
                    # would be incomplete, so the study is assembled again as a new job.
                    self._move(s, study, State.RECEIVING, "new instance after " + study.state)
                    study.job_id = None
                keys.append(study.study_key)
            for item in news:
                self._note_sender(s, item)
        return keys

    @staticmethod
    def _without_series_conflicts(
        study: Study, batch: dict[str, ArrivedInstance], existing: dict[str, Instance]
    ) -> bool:
        """Drop from `batch` (and `existing`) the arrivals of an instance recorded in another
        series; whether any arrival is left.

        One SOP Instance UID names one object (PS3.5 9): the receivers refuse it in a second
        series (0x0111), and a stray copy an older version stored is never taken for the
        recorded one, which would switch the study's input from one series to the other.
        """
        moved = [sop for sop, row in existing.items() if row.series_uid != batch[sop].series_uid]
        if moved:
            log.warning(
                "study %s: %d instance(s) arrived in another series than recorded; "
                "the recorded ones are kept",
                study.study_key,
                len(moved),
            )
        for sop in moved:
            del batch[sop]
            del existing[sop]
        return bool(batch)

    @staticmethod
    def _note_sender(s: Session, item: Interruption | CleanSend) -> None:
        """Mark a receiving study's delivery interrupted, or clear that when a re-send that
        began after the interruption went through cleanly. A study that has moved on keeps
        nothing: an instance the sender sends again reopens it anyway."""
        study = s.scalar(select(Study).where(Study.study_uid == item.study_uid))
        if study is None or study.state != State.RECEIVING:
            return
        if isinstance(item, Interruption):
            study.interruption = item.what
            study.interrupted_at = item.at
        elif study.interruption and item.began > as_utc(study.interrupted_at):
            study.interruption = ""

    @staticmethod
    def _study_for_arrivals(s: Session, study_uid: str, batch: Iterable[ArrivedInstance]) -> Study:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is not None:
            return study
        first = min(a.received_at for a in batch)
        study = Study(
            study_uid=study_uid,
            study_key=study_key(study_uid),
            state=State.RECEIVING,
            reason="",
            attempts=0,
            instance_count=0,
            first_arrival=first,
            last_arrival=first,
            updated_at=first,
        )
        s.add(study)
        s.flush()
        s.add(Transition(study_id=study.id, state=State.RECEIVING, at=first))
        return study

    def instance_digests(self, study_id: int) -> dict[Path, str]:
        """The content digest of each of a study's instances, by path ("" where not known)."""
        with self.session() as s:
            rows = s.execute(
                select(Instance.path, Instance.digest).where(Instance.study_id == study_id)
            ).all()
            return {Path(p): str(d) for p, d in rows}

    def known_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Instance.path)))

    # -- queries ----------------------------------------------------------------------------

    def get(self, study_uid: str) -> Study | None:
        with self.session() as s:
            return s.scalar(select(Study).where(Study.study_uid == study_uid))

    def by_job(self, job_id: str) -> Study | None:
        with self.session() as s:
            return s.scalar(select(Study).where(Study.job_id == job_id))

    def in_states(self, states: Iterable[State]) -> list[Study]:
        with self.session() as s:
            return list(s.scalars(select(Study).where(Study.state.in_([str(x) for x in states]))))

    def by_key(self, key: str) -> Study | None:
        """The study whose key (or a unique prefix of it, at least 6 characters) is `key`."""
        if len(key) < 6:
            return None
        with self.session() as s:
            found = list(s.scalars(select(Study).where(Study.study_key.startswith(key)).limit(2)))
            return found[0] if len(found) == 1 else None

    def series_contents(self, study_id: int) -> list[tuple[str, str, int]]:
        """(series UID, SOP Class UID, instance count) of everything stored for a study."""
        with self.session() as s:
            rows = s.execute(
                select(Instance.series_uid, Instance.sop_class_uid, func.count())
                .where(Instance.study_id == study_id)
                .group_by(Instance.series_uid, Instance.sop_class_uid)
                .order_by(Instance.series_uid, Instance.sop_class_uid)
            ).all()
            return [(str(a), str(b), int(c)) for a, b, c in rows]

    def instance_paths(self, study_id: int) -> list[Path]:
        with self.session() as s:
            rows = s.scalars(select(Instance.path).where(Instance.study_id == study_id))
            return [Path(p) for p in rows]

    def recent(self, limit: int = 50) -> list[StudyStatus]:
        with self.session() as s:
            studies = list(s.scalars(select(Study).order_by(Study.updated_at.desc()).limit(limit)))
            return [self._status(s, st) for st in studies]

    def status(self, study: Study) -> StudyStatus:
        """One study's status line, with the time it last entered each state."""
        with self.session() as s:
            return self._status(s, study)

    @staticmethod
    def _status(s: Session, st: Study) -> StudyStatus:
        rows = s.execute(
            select(Transition.state, func.max(Transition.at))
            .where(Transition.study_id == st.id)
            .group_by(Transition.state)
        ).all()
        order = list(State)
        stages = sorted(
            ((State(state), as_utc(at)) for state, at in rows),
            key=lambda item: (item[1], order.index(item[0])),
        )
        return StudyStatus(
            study_key=st.study_key,
            state=State(st.state),
            reason=st.reason,
            instance_count=st.instance_count,
            stages=tuple(stages),
        )

    # -- retention --------------------------------------------------------------------------

    def purgeable(self, cutoff: datetime) -> list[Study]:
        """`done` and `skipped` studies unchanged since before `cutoff` and not purged since."""
        with self.session() as s:
            query = select(Study).where(*_purgeable(cutoff)).order_by(Study.updated_at)
            return list(s.scalars(query))

    @contextlib.contextmanager
    def purging(self, study_uid: str, cutoff: datetime, now: datetime) -> Iterator[bool]:
        """Claim a study for deleting its files: yields whether it is still purgeable.

        The claim is one conditional UPDATE that records the purge; its transaction stays open
        for the block, holding the study's row (PostgreSQL) or the write lock (SQLite), so no
        arrival can reopen the study while its files go. An exception in the block undoes it.
        """
        with self.session() as s, s.begin():
            claimed = s.execute(
                update(Study)
                .where(Study.study_uid == study_uid, *_purgeable(cutoff))
                .values(purged_at=now)
                .execution_options(synchronize_session=False)
            )
            yield cast(CursorResult[Any], claimed).rowcount == 1

    # -- state machine ----------------------------------------------------------------------

    def transition(
        self,
        study_uid: str,
        target: State,
        reason: str = "",
        *,
        job_id: str | None = None,
        expect_job: str | None = None,
        expect_state: Sequence[State] | None = None,
        input_digest: str | None = None,
        revision: int | None = None,
    ) -> None:
        """Move a study to `target`, recording when and why.

        `expect_job` makes the move conditional on the study still belonging to that job: a
        worker finishing a job that new instances have superseded gets `Superseded`.
        `input_digest` and `revision` go with a new `job_id`: what the job processes. On DONE
        the job's input digest is remembered, so that an unchanged input is not sent again.
        """
        with self.session() as s, s.begin():
            study = s.scalar(select(Study).where(Study.study_uid == study_uid).with_for_update())
            if study is None:
                raise PermanentError("unknown study")
            if expect_job is not None and study.job_id != expect_job:
                raise Superseded(f"job {expect_job} superseded for study {study.study_key}")
            if expect_state is not None and State(study.state) not in expect_state:
                raise InvalidTransition(
                    f"study {study.study_key} is {study.state}, expected one of "
                    + ", ".join(expect_state)
                )
            if not allowed(State(study.state), target):
                raise InvalidTransition(f"study {study.study_key}: {study.state} -> {target}")
            if job_id is not None:
                study.job_id = job_id
                study.attempts = 0
            if input_digest is not None:
                study.input_digest = input_digest
            if revision is not None:
                study.revision = revision
            if target is State.DONE and study.state == State.EXPORTING:
                study.done_digest = study.input_digest
            if target is State.EXPORTING and study.state == State.EXPORTING:
                study.attempts += 1
            if target is State.COMPLETE:
                study.interruption = ""  # sealed: what the sealing reason says stands for it
            self._move(s, study, target, reason)

    @staticmethod
    def _move(s: Session, study: Study, target: State, reason: str) -> None:
        now = utcnow()
        study.state = target
        study.reason = reason
        study.updated_at = now
        s.add(Transition(study_id=study.id, state=target, reason=reason, at=now))


def _purgeable(cutoff: datetime) -> tuple[ColumnElement[bool], ...]:
    # Failed studies are kept: their results were never exported, a person decides.
    return (
        Study.state.in_([str(State.DONE), str(State.SKIPPED)]),
        Study.updated_at < cutoff,
        Study.purged_at < Study.updated_at,
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # WAL lets the receiver's assembler write while workers and `status` read; the busy timeout
    # makes separate worker processes wait for the lock instead of failing.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
