"""Task retry policy, and what the infer task does with a job whose model is paused or off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import Retry

from agent.assembly.assembler import Assembler
from agent.commands import cmd_study
from agent.db.database import Database
from agent.db.states import State
from agent.db.switches import ModelSwitches
from agent.logs import study_key
from agent.pipeline import PipelineContext, export, results_dir
from agent.queue.app import EXPORT, INFER, create_app
from agent.queue.routing import consumed_queues
from agent.queue.tasks import backoff_seconds, next_attempt
from agent.settings import (
    DatabaseSettings,
    DestinationSettings,
    ModelSettings,
    Settings,
    SpoolSettings,
)
from agent.spool.layout import SpoolLayout
from tests.assembly.test_assembler import T0, FakeClock, Recorder, _spool
from tests.support.phantom import write_phantom_series
from tests.support.ports import free_port


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, 5, 60) for n in range(6)] == [5, 10, 20, 40, 60, 60]


def test_the_next_attempt_is_a_time_of_day_with_the_date_when_it_is_another_day() -> None:
    now = datetime(2026, 3, 1, 10, 4, 2, 500_000, tzinfo=UTC)
    assert next_attempt(15, 3, now) == "next attempt at 10:04:17 UTC (attempt 3)"
    late = datetime(2026, 3, 1, 23, 59, 50, tzinfo=UTC)
    assert next_attempt(600, 2, late) == "next attempt at 2026-03-02 00:09:50 UTC (attempt 2)"


# -- the infer task and the model switches --------------------------------------------------------


@dataclass
class Job:
    """One study sealed by the assembler and queued, with what a worker needs to run its job."""

    ctx: PipelineContext
    app: Celery
    assembler: Assembler
    recorder: Recorder
    study_uid: str
    job_id: str

    def infer(self) -> None:
        """The infer task, run here as a worker runs it."""
        self.app.tasks[INFER].apply(args=[self.job_id]).get(disable_sync_subtasks=False)

    def sent(self) -> list[tuple[str, str, str]]:
        """(queue, task, job) of each message the tasks sent, taken off the broker."""
        messages = []
        with self.app.connection_for_read() as conn:
            for queue in consumed_queues("all"):
                while (message := conn.default_channel.basic_get(queue, no_ack=True)) is not None:
                    args, _kwargs, _embed = message.decode()
                    messages.append((queue, message.headers["task"], args[0]))
        return messages

    def state(self) -> str:
        study = self.ctx.db.get(self.study_uid)
        assert study is not None
        return f"{study.state}: {study.reason}"


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    with _job(tmp_path) as rig:
        yield rig


@contextmanager
def _job(tmp_path: Path, destinations: tuple[DestinationSettings, ...] = ()) -> Iterator[Job]:
    # "second" is urgent: so is every study it takes, whether it runs or not.
    models = (ModelSettings(), ModelSettings(name="second", priority="urgent"))
    settings = Settings(
        spool=SpoolSettings(path=tmp_path / "spool"),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'agent.db'}"),
        models=models,
        destinations=destinations,
    )
    layout = SpoolLayout(settings.spool.path)
    layout.create()
    db = Database(settings.database_url)
    db.create_schema()
    clock, recorder = FakeClock(), Recorder()
    assembler = Assembler(
        db, layout, quiet_seconds=30, models=models, enqueue=recorder, clock=clock
    )
    truth = write_phantom_series(tmp_path / "ct", slices=6, rows=32, cols=32)
    db.record_arrivals(_spool(layout, list(truth.files), T0))
    clock.at = T0 + timedelta(minutes=1)
    assembler.seal_quiet_studies()
    ((job_id, _),) = recorder.jobs
    ctx = PipelineContext(settings, db, layout)
    app = create_app(settings, lambda: ctx)
    rig = Job(ctx, app, assembler, recorder, truth.study_uid, job_id)
    rig.sent()  # the in-memory queues are process-wide: start (and end) empty
    try:
        yield rig
    finally:
        rig.sent()
        db.dispose()


@pytest.mark.parametrize("since", [State.QUEUED, State.INFERRING])
def test_a_job_for_a_paused_model_is_held_not_run(job: Job, since: State) -> None:
    if since == State.INFERRING:  # a retry, or a redelivery after a worker died
        job.ctx.db.transition(job.study_uid, State.INFERRING, "retrying", expect_job=job.job_id)
    ModelSwitches(job.ctx.db).set("second", "paused")
    job.infer()
    assert job.state() == "queued: held: model second is paused"
    assert not results_dir(job.ctx, job.job_id).exists()
    assert job.sent() == []  # acknowledged, neither retried nor passed on

    job.recorder.jobs.clear()
    job.assembler.retry_waiting()  # still paused: it stays
    assert job.recorder.jobs == []
    ModelSwitches(job.ctx.db).reset("second")
    job.assembler.retry_waiting()
    assert [j for j, _ in job.recorder.jobs] == [job.job_id]


def test_a_job_whose_models_are_all_switched_off_is_skipped(job: Job) -> None:
    switches = ModelSwitches(job.ctx.db)
    switches.set("ct-tissue", "off")
    switches.set("second", "off")
    job.infer()
    assert job.state() == ("skipped: model ct-tissue is switched off; model second is switched off")


def test_a_model_switched_off_is_not_run_nor_exported(job: Job) -> None:
    ModelSwitches(job.ctx.db).set("second", "off")
    job.infer()  # ct-tissue runs; "second" (no such model: it would fail) does not
    out = results_dir(job.ctx, job.job_id)
    assert sorted(p.name for p in out.iterdir()) == ["ct-tissue"]
    assert job.state() == "exporting: encoding and sending"
    # An urgent study's export is urgent too.
    assert job.sent() == [("io.urgent", EXPORT, job.job_id)]
    export(job.ctx, job.job_id)
    assert job.state() == "done: 2 objects kept in the outbox: no destination configured"


def test_results_of_a_model_switched_off_after_it_ran_are_not_sent(job: Job) -> None:
    switches = ModelSwitches(job.ctx.db)
    switches.set("second", "off")
    job.infer()
    assert job.sent() == [("io.urgent", EXPORT, job.job_id)]
    switches.set("ct-tissue", "off")  # the kill switch, between inference and export
    job.app.tasks[EXPORT].apply(args=[job.job_id]).get(disable_sync_subtasks=False)
    assert job.state() == ("skipped: model ct-tissue is switched off; model second is switched off")
    assert not (job.ctx.layout.job_dir(job.job_id) / "outbox").exists()


def test_an_export_that_cannot_connect_says_why_how_far_it_got_and_when_it_tries_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    pacs = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    with _job(tmp_path, (pacs,)) as job:
        ModelSwitches(job.ctx.db).set("second", "off")
        job.infer()
        job.sent()
        before = datetime.now(UTC)
        with pytest.raises(Retry):
            job.app.tasks[EXPORT](job.job_id)
        after = datetime.now(UTC)
        state = job.state()
        found = re.fullmatch(
            r"exporting: next attempt at ((?:\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d) UTC "
            r"\(attempt 2\): "
            rf"destination pacs: connection refused at 127\.0\.0\.1:{port}",
            state,
        )
        assert found, state
        # The first wait is 5 to 10 s (retry_backoff_seconds 10, its upper half), from now.
        when = found[1] if len(found[1]) > 8 else f"{before:%Y-%m-%d} {found[1]}"
        at = datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        assert before.replace(microsecond=0) + timedelta(seconds=4) <= at
        assert at <= after + timedelta(seconds=10)

        capsys.readouterr()
        cmd_study(job.ctx.settings, study_key(job.study_uid))
        lines = capsys.readouterr().out.splitlines()
        [line] = [x for x in lines if x.startswith("  to pacs:")]
        assert line.startswith("  to pacs: 0 of 2 objects stored, 1 attempt since "), line
        assert line.endswith(
            f"Z; last error: destination pacs: connection refused at 127.0.0.1:{port}"
        ), line
