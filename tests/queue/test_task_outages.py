"""The tasks when a resource goes missing mid-step: a database that does not answer, a full
disk. The study is not failed and nothing is counted against it; the task runs again a few
seconds later, and the study goes on once the resource is back."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import event

from agent.assembly.assembler import Assembler
from agent.db.database import Database
from agent.db.leases import Leases
from agent.db.switches import ModelSwitches
from agent.pipeline import PipelineContext, results_dir
from agent.queue.app import EXPORT, INFER, create_app
from agent.queue.routing import consumed_queues
from agent.queue.tasks import DATABASE_RETRY_SECONDS, DISK_RETRY_SECONDS
from agent.settings import DatabaseSettings, ModelSettings, Settings, SpoolSettings
from agent.spool.layout import SpoolLayout
from tests.assembly.test_assembler import T0, FakeClock, Recorder, _spool
from tests.support.phantom import write_phantom_series
from tests.support.tmpfs import fill, small_filesystem


class Outage:
    """Every statement on the engine fails as the driver fails when its database is gone,
    from the moment `down()` says so (or `when` first holds) until `up()`."""

    def __init__(self, db: Database) -> None:
        self.failing = False
        self.when: Any = None
        self.dialect = db.engine.dialect.name
        event.listen(db.engine, "before_cursor_execute", self._check)

    def _check(self, _conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if self.when is not None and self.when(statement):
            self.failing, self.when = True, None
        if not self.failing:
            return
        if self.dialect == "sqlite":
            raise sqlite3.OperationalError("disk I/O error")
        import psycopg

        raise psycopg.OperationalError("server closed the connection unexpectedly")

    def up(self) -> None:
        self.failing = False


@dataclass
class Job:
    ctx: PipelineContext
    app: Celery
    study_uid: str
    job_id: str

    def run(self, task: str) -> None:
        """The task, run here as a worker runs it (a retry it schedules goes to the broker)."""
        self.app.tasks[task].apply(args=[self.job_id])

    def sent(self) -> list[tuple[str, str, float | None]]:
        """(task, queue, countdown-ish: has an ETA) of each message sent, taken off the broker."""
        messages = []
        with self.app.connection_for_read() as conn:
            for queue in consumed_queues("all"):
                while (message := conn.default_channel.basic_get(queue, no_ack=True)) is not None:
                    messages.append((message.headers["task"], queue, message.headers.get("eta")))
        return messages

    def state(self) -> str:
        study = self.ctx.db.get(self.study_uid)
        assert study is not None
        return f"{study.state}: {study.reason}"


@contextlib.contextmanager
def sealed_job(spool: Path, database_url: str, tmp_path: Path) -> Iterator[Job]:
    settings = Settings(
        spool=SpoolSettings(path=spool),
        database=DatabaseSettings(url=database_url),
        models=(ModelSettings(device="cpu"),),
    )
    layout = SpoolLayout(settings.spool.path)
    layout.create()
    db = Database(settings.database_url)
    db.create_schema()
    clock, recorder = FakeClock(), Recorder()
    assembler = Assembler(
        db, layout, quiet_seconds=30, models=settings.models, enqueue=recorder, clock=clock
    )
    truth = write_phantom_series(tmp_path / "ct", slices=6, rows=32, cols=32)
    db.record_arrivals(_spool(layout, list(truth.files), T0))
    clock.at = T0 + timedelta(minutes=1)
    assembler.seal_quiet_studies()
    ((job_id, _),) = recorder.jobs
    ctx = PipelineContext(settings, db, layout)
    rig = Job(ctx, create_app(settings, lambda: ctx), truth.study_uid, job_id)
    rig.sent()  # the in-memory queues are process-wide: start (and end) empty
    try:
        yield rig
    finally:
        rig.sent()
        db.dispose()


@pytest.fixture
def job(database_url: str, tmp_path: Path) -> Iterator[Job]:
    with sealed_job(tmp_path / "spool", database_url, tmp_path) as rig:
        yield rig


def test_database_down_mid_inference_is_waited_for_not_a_failure(
    job: Job, caplog: pytest.LogCaptureFixture
) -> None:
    outage = Outage(job.ctx.db)
    # The database goes away once the model has run and its results are written.
    result = results_dir(job.ctx, job.job_id) / "ct-tissue" / "result.json"
    outage.when = lambda _statement: result.is_file()
    with caplog.at_level("INFO"):
        job.run(INFER)
    outage.up()
    assert job.state() == "inferring: "  # nothing written while it was down
    assert job.sent() == [(INFER, "gpu", _eta())]  # again, a few seconds later
    assert "database unavailable (disk I/O error" in caplog.text or (
        "database unavailable (server closed the connection" in caplog.text
    )
    assert "study failed" not in caplog.text
    assert f"runs again in {DATABASE_RETRY_SECONDS:.0f} s" in caplog.text

    # Back: the delivery finds the results and goes on; not one attempt was counted.
    job.run(INFER)
    assert job.state() == "exporting: encoding and sending"
    assert [m[0] for m in job.sent()] == [EXPORT]
    study = job.ctx.db.get(job.study_uid)
    assert study is not None and study.attempts == 0


def test_database_down_when_a_study_is_to_end_is_not_logged_as_ended(
    job: Job, caplog: pytest.LogCaptureFixture
) -> None:
    ModelSwitches(job.ctx.db).set("ct-tissue", "off")  # the study is to end skipped
    outage = Outage(job.ctx.db)
    outage.when = lambda statement: statement.startswith("UPDATE study")
    with caplog.at_level("INFO"):
        job.run(INFER)
    outage.up()
    assert "study skipped" not in caplog.text
    assert "database unavailable" in caplog.text
    assert job.state().startswith("queued")
    assert [m[0] for m in job.sent()] == [INFER]
    job.run(INFER)
    assert job.state() == "skipped: model ct-tissue is switched off"


def test_database_down_during_export_is_waited_for(job: Job) -> None:
    job.run(INFER)
    assert [m[0] for m in job.sent()] == [EXPORT]
    outage = Outage(job.ctx.db)
    outbox = job.ctx.layout.job_dir(job.job_id) / "outbox"
    outage.when = lambda _statement: outbox.is_dir() and len(list(outbox.glob("*.dcm"))) == 2
    job.run(EXPORT)
    outage.up()
    assert job.state() == "exporting: encoding and sending"
    assert job.sent() == [(EXPORT, "io", _eta())]
    job.run(EXPORT)
    assert job.state() == "done: 2 objects kept in the outbox: no destination configured"
    assert Leases(job.ctx.db).expiries([job.job_id]) == {}


def test_disk_full_while_saving_results_waits_for_space(database_url: str, tmp_path: Path) -> None:
    with (
        small_filesystem(tmp_path / "small", size_mb=4) as small,
        sealed_job(small / "spool", database_url, tmp_path) as job,
    ):
        filler = fill(small)
        job.run(INFER)
        waiting = (
            "inferring: waiting for disk space: results could not be written "
            "(no space left on device)"
        )
        assert job.state() == waiting
        assert job.sent() == [(INFER, "gpu", _eta())]
        job.run(INFER)  # still full: still waiting, said once
        assert job.state() == waiting
        assert [m[0] for m in job.sent()] == [INFER]
        study = job.ctx.db.get(job.study_uid)
        assert study is not None and study.attempts == 0

        filler.unlink()
        job.run(INFER)
        assert job.state() == "exporting: encoding and sending"
        assert [m[0] for m in job.sent()] == [EXPORT]

        filler = fill(small)
        job.run(EXPORT)
        assert job.state() == (
            "exporting: waiting for disk space: the outbox could not be written "
            "(no space left on device)"
        )
        assert job.sent() == [(EXPORT, "io", _eta())]
        filler.unlink()
        job.run(EXPORT)
        assert job.state() == "done: 2 objects kept in the outbox: no destination configured"
    assert DISK_RETRY_SECONDS < 60


class _Eta:
    """Equal to any ETA header that is set: the message is delayed, not for now."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __repr__(self) -> str:
        return "<an ETA>"


def _eta() -> Any:
    return _Eta()
