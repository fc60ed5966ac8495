"""Retention: only done and skipped studies past the limit lose their files, and it is recorded."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.db.database import Database
from agent.db.schema import NEVER_PURGED
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.logs import study_key
from agent.spool.layout import SpoolLayout
from agent.spool.retention import RetentionSweeper, purge_expired
from agent.spool.writer import write_atomic

WEEK = timedelta(days=7)
CT = "1.2.840.10008.5.1.4.1.1.2"
# Each state a study can be in, and the path (after COMPLETE) that takes it there.
ROUTES: dict[State, tuple[State, ...]] = {
    State.RECEIVING: (),
    State.COMPLETE: (State.COMPLETE,),
    State.QUEUED: (State.COMPLETE, State.QUEUED),
    State.INFERRING: (State.COMPLETE, State.QUEUED, State.INFERRING),
    State.EXPORTING: (State.COMPLETE, State.QUEUED, State.INFERRING, State.EXPORTING),
    State.DONE: (State.COMPLETE, State.QUEUED, State.INFERRING, State.EXPORTING, State.DONE),
    State.SKIPPED: (State.COMPLETE, State.SKIPPED),
    State.FAILED: (State.COMPLETE, State.QUEUED, State.INFERRING, State.FAILED),
}


@dataclass(frozen=True)
class Spooled:
    study_uid: str
    files: tuple[Path, ...]

    @property
    def folders(self) -> tuple[Path, ...]:
        return tuple(sorted({f.parent for f in self.files}))


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.create()
    return spool


def _arrive(db: Database, layout: SpoolLayout, study_uid: str, sop_uid: str) -> Path:
    series_uid = study_uid + ".1"
    path = layout.instance_path(study_uid, series_uid, sop_uid)
    write_atomic(path, [b"instance " + sop_uid.encode()], layout.tmp)
    db.record_arrivals(
        [ArrivedInstance(study_uid, series_uid, sop_uid, CT, path, datetime.now(UTC))]
    )
    return path


def _study(db: Database, layout: SpoolLayout, n: int, state: State) -> Spooled:
    """A study in `state` with two instances and, once queued, a job folder with every output."""
    study_uid = f"1.2.826.0.1.3680043.8.498.{n}"
    files = [_arrive(db, layout, study_uid, f"{study_uid}.1.{i}") for i in (1, 2)]
    job_id = f"{study_key(study_uid)}-{n:012x}"
    for step in ROUTES[state]:
        db.transition(study_uid, step, job_id=job_id if step is State.QUEUED else None)
    if state not in (State.RECEIVING, State.COMPLETE, State.SKIPPED):
        job = layout.job_dir(job_id)
        for relative in ("manifest.json", "results/ct-tissue/labels.npz", "outbox/seg.dcm"):
            write_atomic(job / relative, [b"output"], layout.tmp)
            files.append(job / relative)
    return Spooled(study_uid, tuple(files))


def _backdate(spooled: Spooled, age: timedelta) -> None:
    """Make the files as old as a study finished `age` ago would have them."""
    when = (datetime.now(UTC) - age).timestamp()
    for path in spooled.files:
        os.utime(path, (when, when))


def _purged_at(db: Database, study_uid: str) -> datetime:
    study = db.get(study_uid)
    assert study is not None
    value = study.purged_at
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_only_done_and_skipped_studies_lose_their_files(db: Database, layout: SpoolLayout) -> None:
    studies = {state: _study(db, layout, n, state) for n, state in enumerate(State, start=1)}
    now = datetime.now(UTC) + timedelta(days=8)
    report = purge_expired(db, layout, retention=WEEK, now=now)

    purged = {State.DONE, State.SKIPPED}
    assert report.studies == 2
    assert report.files == 2 + 3 + 2  # done: 2 instances + 3 outputs; skipped: 2 instances
    assert report.bytes > 0
    for state, spooled in studies.items():
        if state in purged:
            assert not any(f.exists() for f in spooled.files), state
            assert not layout.study_dir(spooled.study_uid).exists(), state
            assert _purged_at(db, spooled.study_uid) == now
        else:
            # Failed results were never exported; the rest is still being worked on.
            assert all(f.exists() for f in spooled.files), state
            assert _purged_at(db, spooled.study_uid) == NEVER_PURGED
    assert not list(layout.jobs.glob(f"{study_key(studies[State.DONE].study_uid)}-*"))
    # The state, its reason and the instance rows stay: `pacs-agent status` still tells the story.
    done = db.get(studies[State.DONE].study_uid)
    assert done is not None and done.state == State.DONE and done.instance_count == 2
    assert layout.studies.is_dir() and layout.jobs.is_dir() and layout.tmp.is_dir()


def test_studies_within_the_retention_are_kept(db: Database, layout: SpoolLayout) -> None:
    spooled = _study(db, layout, 1, State.DONE)
    report = purge_expired(db, layout, retention=WEEK, now=datetime.now(UTC) + timedelta(days=6))
    assert report.studies == 0
    assert all(f.exists() for f in spooled.files)
    assert _purged_at(db, spooled.study_uid) == NEVER_PURGED


def test_files_written_after_the_cutoff_are_kept(db: Database, layout: SpoolLayout) -> None:
    """An instance acknowledged a moment ago, not yet recorded by the assembler, survives."""
    spooled = _study(db, layout, 1, State.DONE)
    now = datetime.now(UTC) + timedelta(days=8)
    late = spooled.files[0]
    os.utime(late, (now.timestamp(), now.timestamp()))
    purge_expired(db, layout, retention=WEEK, now=now)
    assert late.exists()
    assert [f for f in spooled.files if f.exists()] == [late]


def test_purging_twice_deletes_nothing_more_and_a_reopened_study_is_swept_again(
    db: Database, layout: SpoolLayout
) -> None:
    # Real time throughout, with a retention of a millisecond: the database stamps its own
    # changes with the real clock.
    retention = timedelta(milliseconds=1)
    spooled = _study(db, layout, 1, State.SKIPPED)
    _backdate(spooled, timedelta(hours=1))
    time.sleep(0.01)
    first = purge_expired(db, layout, retention=retention, now=datetime.now(UTC))
    assert (first.studies, first.files) == (1, 2)
    again = purge_expired(db, layout, retention=retention, now=datetime.now(UTC))
    assert again.studies == 0

    # A late instance reopens the study; once finished again, its new files are due in turn.
    late = _arrive(db, layout, spooled.study_uid, spooled.study_uid + ".1.3")
    study = db.get(spooled.study_uid)
    assert study is not None and study.state == State.RECEIVING
    assert not purge_expired(db, layout, retention=retention, now=datetime.now(UTC)).studies
    for step in ROUTES[State.SKIPPED]:
        db.transition(spooled.study_uid, step)
    _backdate(Spooled(spooled.study_uid, (late,)), timedelta(hours=1))
    time.sleep(0.01)
    third = purge_expired(db, layout, retention=retention, now=datetime.now(UTC))
    assert (third.studies, third.files) == (1, 1)
    assert not late.exists()


def test_a_reopened_study_cannot_be_claimed(db: Database, layout: SpoolLayout) -> None:
    """The claim re-checks the state: a study reopened after the query is not purged."""
    spooled = _study(db, layout, 1, State.DONE)
    now = datetime.now(UTC) + timedelta(days=8)
    (candidate,) = db.purgeable(now - WEEK)
    _arrive(db, layout, spooled.study_uid, spooled.study_uid + ".1.3")
    with db.purging(candidate.study_uid, now - WEEK, now) as claimed:
        assert not claimed
    assert _purged_at(db, spooled.study_uid) == NEVER_PURGED


def test_a_failed_deletion_leaves_the_study_due(
    db: Database,
    layout: SpoolLayout,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spooled = _study(db, layout, 1, State.DONE)
    now = datetime.now(UTC) + timedelta(days=8)

    def refuse(path: str) -> None:
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as patch:
        patch.setattr("agent.spool.retention.os.unlink", refuse)
        report = purge_expired(db, layout, retention=WEEK, now=now)
    assert report.studies == 0
    assert all(f.exists() for f in spooled.files)
    assert _purged_at(db, spooled.study_uid) == NEVER_PURGED
    assert any(
        r.levelno == logging.ERROR and "Permission denied" in r.getMessage() for r in caplog.records
    )
    # Once the fault is gone, the next sweep finishes the job.
    assert purge_expired(db, layout, retention=WEEK, now=now).studies == 1
    assert not any(f.exists() for f in spooled.files)


def test_a_database_from_before_retention_gains_the_column(db: Database) -> None:
    """The additive migration: `purged_at` is added with its 'never' default to old rows."""
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    db.record_arrivals(
        [ArrivedInstance(study_uid, "1.2.3", "1.2.3.4", CT, Path("/s/x"), datetime.now(UTC))]
    )
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE study DROP COLUMN purged_at"))
    db.create_schema()
    assert _purged_at(db, study_uid) == NEVER_PURGED
    db.transition(study_uid, State.COMPLETE)
    db.transition(study_uid, State.SKIPPED, "nothing to do")
    (due,) = db.purgeable(datetime.now(UTC) + timedelta(seconds=1))
    assert due.study_uid == study_uid


def test_sweeper_runs_at_start_and_stops(db: Database, layout: SpoolLayout) -> None:
    spooled = _study(db, layout, 1, State.DONE)
    sweeper = RetentionSweeper(
        db, layout, retention_days=7, now=lambda: datetime.now(UTC) + timedelta(days=8)
    )
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while any(f.exists() for f in spooled.files) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sweeper.stop()
    assert not any(f.exists() for f in spooled.files)


def test_zero_days_keeps_everything(db: Database, layout: SpoolLayout) -> None:
    spooled = _study(db, layout, 1, State.DONE)
    sweeper = RetentionSweeper(
        db, layout, retention_days=0, now=lambda: datetime.now(UTC) + timedelta(days=800)
    )
    sweeper.start()
    sweeper.stop()
    assert all(f.exists() for f in spooled.files)
    with pytest.raises(ValueError, match="positive"):
        purge_expired(db, layout, retention=timedelta(0), now=datetime.now(UTC))
