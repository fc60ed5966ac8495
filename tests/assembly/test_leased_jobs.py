"""The assembler and job leases: a job whose worker died is sent again as soon as its lease
expires, once per lease; a live worker's job never is, however long it runs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from agent.assembly.assembler import Assembler
from agent.db.database import Database, utcnow
from agent.db.leases import Leases
from agent.db.states import State
from agent.settings import ModelSettings
from agent.spool.layout import SpoolLayout
from tests.assembly.test_assembler import T0, FakeClock, Recorder, _spool
from tests.support.phantom import write_phantom_series

HOUR = 3600.0


def test_a_job_whose_worker_died_is_sent_again_once_per_lease(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    clock, recorder = FakeClock(), Recorder()
    assembler = Assembler(
        db,
        layout,
        quiet_seconds=30,
        models=(ModelSettings(),),
        enqueue=recorder,
        clock=clock,
        stale_after=HOUR,
    )
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    db.record_arrivals(_spool(layout, list(truth.files), T0))
    clock.at = T0 + timedelta(minutes=1)
    assembler.seal_quiet_studies()
    study = db.get(truth.study_uid)
    assert study is not None and study.job_id is not None
    job, key = study.job_id, study.study_key
    recorder.jobs.clear()

    # A worker takes the job and runs it: a long inference, far past stale_after.
    leases = Leases(db)
    assert leases.acquire(job, "gpu-1:100", 30)
    db.transition(truth.study_uid, State.INFERRING, expect_job=job)
    expires = leases.expiries([job])[job]
    leases.renew(job, "gpu-1:100", 2 * HOUR)  # still renewed
    clock.at = expires + timedelta(seconds=HOUR + 60)
    assembler.requeue_stale()
    assert recorder.jobs == []

    # It is killed: its lease runs out, and the job goes to the broker again at once.
    leases.expire(job, "gpu-1:100")
    expired = leases.expiries([job])[job]
    clock.at = expired + timedelta(seconds=1)
    with caplog.at_level("WARNING", logger="agent.assembly.assembler"):
        assembler.requeue_stale()
    assert [j for j, _ in recorder.jobs] == [job]
    assert f"study {key} its worker stopped 1 s ago: sending its job again" in caplog.text
    clock.at = expired + timedelta(seconds=20)
    assembler.requeue_stale()  # sent already for this lease; the message waits for a worker
    assert len(recorder.jobs) == 1

    # The next worker takes it over, and dies too: sent again.
    assert leases.acquire(job, "gpu-2:200", 30)
    taken = leases.expiries([job])[job]
    clock.at = taken - timedelta(seconds=1)
    assembler.requeue_stale()
    assert len(recorder.jobs) == 1
    clock.at = taken + timedelta(seconds=1)
    assembler.requeue_stale()
    assert [j for j, _ in recorder.jobs] == [job, job]

    # Without a lease (released: the job waits in the broker), stale_after is the backstop.
    leases.release(job, "gpu-2:200")
    clock.at = taken + timedelta(seconds=HOUR - 10)
    assembler.requeue_stale()
    assert len(recorder.jobs) == 2
    clock.at = taken + timedelta(seconds=HOUR + 10)
    assembler.requeue_stale()
    assert len(recorder.jobs) == 3


def test_leases_long_expired_of_jobs_no_longer_in_flight_are_forgotten(
    db: Database, tmp_path: Path
) -> None:
    """A killed worker's lease of a job since superseded was kept for ever; now the assembler
    deletes it once it is an hour old, and keeps the expired lease of a job still in flight
    (that one says its worker died)."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    clock = FakeClock()
    assembler = Assembler(
        db,
        layout,
        quiet_seconds=30,
        models=(ModelSettings(),),
        enqueue=Recorder(),
        clock=clock,
        stale_after=HOUR,
    )
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    db.record_arrivals(_spool(layout, list(truth.files), T0))
    clock.at = T0 + timedelta(minutes=1)
    assembler.seal_quiet_studies()
    study = db.get(truth.study_uid)
    assert study is not None and study.job_id is not None
    leases = Leases(db)
    for job in (study.job_id, "superseded-job"):
        assert leases.acquire(job, "gpu-1:100", 30)
        leases.expire(job, "gpu-1:100")  # its worker was killed
    clock.at = utcnow() + timedelta(seconds=HOUR + 60)
    assembler.requeue_stale()
    assert set(leases.expiries([study.job_id, "superseded-job"])) == {study.job_id}
