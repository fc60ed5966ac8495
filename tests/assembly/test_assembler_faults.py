"""The assembler through the faults a hospital has: a database that stops or fills, a disk
that fails while a study is sealed, a sender cut off mid-study, a trickle that never ends, a
wall clock that steps."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event

from agent.assembly.assembler import Assembler
from agent.assembly.policy import PARTIAL, QUIET_PERIOD
from agent.db.database import Database
from agent.db.states import State
from agent.db.values import CleanSend, Interruption
from agent.domain import Manifest
from agent.errors import RetryableError
from agent.settings import ModelSettings
from agent.spool.layout import SpoolLayout
from tests.assembly.test_assembler import T0, FakeClock, Recorder, _spool
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.postgres import Cluster

QUIET = 30.0


class Rig:
    def __init__(self, db: Database, layout: SpoolLayout, **options: float) -> None:
        self.db, self.layout = db, layout
        self.clock, self.recorder = FakeClock(), Recorder()
        self.assembler = Assembler(
            db,
            layout,
            quiet_seconds=QUIET,
            models=(ModelSettings(),),
            enqueue=self.recorder,
            clock=self.clock,
            **options,  # type: ignore[arg-type]
        )

    def at(self, seconds: float) -> None:
        self.clock.at = T0 + timedelta(seconds=seconds)

    def state(self, study_uid: str) -> tuple[State, str, int]:
        study = self.db.get(study_uid)
        assert study is not None
        return State(study.state), study.reason, study.instance_count

    def manifest(self, study_uid: str) -> Manifest:
        study = self.db.get(study_uid)
        assert study is not None and study.job_id is not None
        return Manifest.from_json(self.layout.manifest_path(study.job_id).read_text())


def _layout(tmp_path: Path) -> SpoolLayout:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    return layout


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    return Rig(db, _layout(tmp_path), sender_retry_seconds=300.0, max_wait_seconds=600.0)


@pytest.fixture
def series(tmp_path: Path) -> PhantomTruth:
    return write_phantom_series(tmp_path / "ct", slices=12, rows=32, cols=32)


# -- 1. a database outage while instances arrive ------------------------------------------------


def _sqlite_full(db: Database) -> Callable[[bool], None]:
    """SQLite's own "database or disk is full": no page may be added beyond those in use."""

    def cap(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {pages}")
        cursor.close()

    def outage(on: bool) -> None:
        if on:
            event.listen(db.engine, "connect", cap)
        else:
            event.remove(db.engine, "connect", cap)
        db.engine.dispose()  # new connections, with or without the cap

    return outage


@pytest.fixture(params=["sqlite-full", "postgresql-stopped"])
def outage_rig(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Rig, Callable[[bool], None]]]:
    if request.param == "sqlite-full":
        db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
        db.create_schema()
        yield Rig(db, _layout(tmp_path)), _sqlite_full(db)
        return
    with Cluster() as cluster:
        db = Database(cluster.url)
        db.create_schema()

        def outage(on: bool) -> None:
            (cluster.stop if on else cluster.start)()

        yield Rig(db, _layout(tmp_path)), outage
        db.dispose()


def test_arrivals_survive_a_database_outage_and_no_study_is_sealed_without_them(
    outage_rig: tuple[Rig, Callable[[bool], None]], series: PhantomTruth
) -> None:
    rig, outage = outage_rig
    arrivals = _spool(rig.layout, list(series.files), T0)
    for arrival in arrivals[:6]:
        rig.assembler.submit(arrival)
    assert rig.assembler.drain() == 6

    outage(True)
    for arrival in arrivals[6:]:  # acknowledged: on disk, announced
        rig.assembler.submit(arrival)
    with pytest.raises(RetryableError, match="database unavailable"):
        rig.assembler.drain()
    with pytest.raises(RetryableError):
        rig.assembler.drain()  # still down: the batch is offered again, and kept again
    rig.at(QUIET + 60)
    if rig.db.engine.dialect.name == "sqlite":  # a full SQLite still reads
        rig.assembler.seal_quiet_studies()
        assert rig.state(series.study_uid) == (State.RECEIVING, "", 6)
        assert rig.recorder.jobs == []

    outage(False)
    assert rig.assembler.drain() == 6
    rig.assembler.seal_quiet_studies()
    state, reason, count = rig.state(series.study_uid)
    assert (state, count) == (State.QUEUED, 12)
    assert reason.startswith("ct-tissue: 12 slices")
    assert len(rig.manifest(series.study_uid).inputs[0].frames) == 12


# -- 2. a sender cut off mid-study --------------------------------------------------------------


def test_an_aborted_delivery_waits_for_the_sender_and_its_re_send_is_sealed_whole(
    rig: Rig, series: PhantomTruth
) -> None:
    arrivals = _spool(rig.layout, list(series.files), T0)
    for arrival in arrivals[:6]:
        rig.assembler.submit(arrival)
    rig.assembler.submit(
        Interruption(series.study_uid, T0, "association aborted after 6 instances")
    )
    rig.assembler.drain()

    rig.at(QUIET + 10)  # quiet, but cut short: wait for the sender
    rig.assembler.seal_quiet_studies()
    state, reason, _ = rig.state(series.study_uid)
    assert state == State.RECEIVING
    assert reason == (
        "waiting up to 300 s for the sender to send again: association aborted after 6 instances"
    )
    assert rig.recorder.jobs == []

    rig.at(100)  # the sender sends the whole study again, on a new association
    for arrival in arrivals:
        rig.assembler.submit(arrival)
    rig.assembler.submit(CleanSend(series.study_uid, T0 + timedelta(seconds=99)))
    rig.assembler.drain()
    rig.at(100 + QUIET)
    rig.assembler.seal_quiet_studies()
    state, reason, count = rig.state(series.study_uid)
    assert (state, count) == (State.QUEUED, 12)
    assert PARTIAL not in reason
    assert rig.manifest(series.study_uid).note == ""


def test_a_delivery_never_sent_again_is_sealed_saying_its_input_may_be_partial(
    rig: Rig, series: PhantomTruth
) -> None:
    arrivals = _spool(rig.layout, list(series.files)[:8], T0)
    for arrival in arrivals:
        rig.assembler.submit(arrival)
    rig.assembler.submit(Interruption(series.study_uid, T0, "4 instances refused for resources"))
    rig.assembler.drain()
    rig.at(299)
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.RECEIVING
    rig.at(300)
    rig.assembler.seal_quiet_studies()
    state, reason, count = rig.state(series.study_uid)
    note = f"not sent again: {PARTIAL} (4 instances refused for resources; waited 300 s)"
    assert (state, count) == (State.QUEUED, 8)
    assert reason == f"ct-tissue: 8 slices; {note}"
    assert rig.manifest(series.study_uid).note == note


def test_a_clean_send_begun_before_the_interruption_does_not_clear_it(
    rig: Rig, series: PhantomTruth
) -> None:
    for arrival in _spool(rig.layout, list(series.files), T0):
        rig.assembler.submit(arrival)
    rig.assembler.submit(Interruption(series.study_uid, T0, "connection lost after 12 instances"))
    # A second association of the same sender, running alongside, ends cleanly afterwards.
    rig.assembler.submit(CleanSend(series.study_uid, T0 - timedelta(seconds=5)))
    rig.assembler.drain()
    rig.at(QUIET)
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.RECEIVING


def test_an_interruption_is_remembered_across_a_restart(
    rig: Rig, series: PhantomTruth, tmp_path: Path
) -> None:
    for arrival in _spool(rig.layout, list(series.files)[:5], T0):
        rig.assembler.submit(arrival)
    rig.assembler.submit(
        Interruption(series.study_uid, T0, "association aborted after 5 instances")
    )
    rig.assembler.drain()
    restarted = Rig(rig.db, rig.layout, sender_retry_seconds=300.0)
    restarted.at(1000)
    restarted.assembler.resume(requeue_in_flight=True)
    restarted.at(1000 + QUIET)
    restarted.assembler.seal_quiet_studies()
    assert restarted.state(series.study_uid)[0] == State.RECEIVING
    restarted.at(1300)  # the wait counts from the restart
    restarted.assembler.seal_quiet_studies()
    state, reason, _ = restarted.state(series.study_uid)
    assert state == State.QUEUED and PARTIAL in reason


# -- 3. sealing interrupted after `complete` ----------------------------------------------------


def test_a_study_whose_sealing_failed_is_sealed_again_once_the_cause_is_gone(
    rig: Rig, series: PhantomTruth, caplog: pytest.LogCaptureFixture
) -> None:
    for arrival in _spool(rig.layout, list(series.files), T0):
        rig.assembler.submit(arrival)
    rig.assembler.drain()
    # The job folder cannot be made (here: a file stands where the jobs folder goes).
    shutil.rmtree(rig.layout.jobs)
    rig.layout.jobs.write_bytes(b"")
    rig.at(QUIET)
    with caplog.at_level("WARNING", logger="agent.assembly.assembler"):
        rig.assembler.seal_quiet_studies()
    state, reason, _ = rig.state(series.study_uid)
    assert (state, reason) == (State.COMPLETE, f"{QUIET_PERIOD}; 12 instances")
    assert "sealing interrupted" in caplog.text
    assert series.study_uid not in caplog.text

    rig.layout.jobs.unlink()
    rig.layout.create()
    rig.at(QUIET + 1)
    rig.assembler.seal_quiet_studies()  # not before its retry is due
    assert rig.state(series.study_uid)[0] == State.COMPLETE
    rig.at(QUIET + 2)
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.QUEUED
    assert len(rig.recorder.jobs) == 1


def test_a_partial_note_survives_a_sealing_that_failed_after_complete(
    rig: Rig, series: PhantomTruth
) -> None:
    for arrival in _spool(rig.layout, list(series.files)[:6], T0):
        rig.assembler.submit(arrival)
    rig.assembler.submit(
        Interruption(series.study_uid, T0, "association aborted after 6 instances")
    )
    rig.assembler.drain()
    shutil.rmtree(rig.layout.jobs)
    rig.layout.jobs.write_bytes(b"")
    rig.at(300)
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.COMPLETE
    rig.layout.jobs.unlink()
    rig.layout.create()
    restarted = Rig(rig.db, rig.layout)  # and serve restarted meanwhile
    restarted.assembler.resume(requeue_in_flight=True)
    assert restarted.state(series.study_uid)[0] == State.QUEUED
    assert PARTIAL in restarted.manifest(series.study_uid).note


# -- 13. a trickle that never ends; the wall clock stepping --------------------------------------


def test_a_trickle_is_sealed_at_the_maximum_wait_with_a_note(
    tmp_path: Path, series: PhantomTruth
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    rig = Rig(db, _layout(tmp_path), max_wait_seconds=200.0)
    arrivals = _spool(rig.layout, list(series.files), T0)

    def arrive(k: int) -> None:  # one instance every 29 s: never 30 s of silence
        rig.at(29 * k)
        rig.assembler.submit(arrivals[k])
        rig.assembler.drain()
        rig.assembler.seal_quiet_studies()

    for k in range(7):
        arrive(k)
        assert rig.state(series.study_uid)[0] == State.RECEIVING
    arrive(7)  # 203 s after the first
    state, reason, count = rig.state(series.study_uid)
    assert (state, count) == (State.QUEUED, 8)
    assert (
        reason == f"ct-tissue: 8 slices; receiving for 200 s: {PARTIAL} (instances still arriving)"
    )
    # The next instance reopens the study, and its own wait starts then.
    arrive(8)
    assert rig.state(series.study_uid)[0] == State.RECEIVING
    arrive(9)
    arrive(10)
    assert rig.state(series.study_uid)[0] == State.RECEIVING


def test_a_wall_clock_step_does_not_seal_a_study_early(rig: Rig, series: PhantomTruth) -> None:
    for arrival in _spool(rig.layout, list(series.files), T0):
        rig.assembler.submit(arrival)
    rig.assembler.drain()
    rig.at(10)
    rig.clock.wall_step = timedelta(hours=1)  # NTP steps the wall clock an hour ahead
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.RECEIVING
    rig.at(QUIET)
    rig.assembler.seal_quiet_studies()
    assert rig.state(series.study_uid)[0] == State.QUEUED
