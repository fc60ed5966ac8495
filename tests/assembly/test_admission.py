"""The assembler's say on a job: urgent or normal (and its queue), a model switched off or
paused, and held jobs sent once their models are on again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pydicom
import pytest

from agent.assembly.assembler import RETRY_REQUESTED, Assembler, Enqueue
from agent.db.database import Database
from agent.db.states import State
from agent.db.switches import ModelSwitches
from agent.domain import Manifest, Priority
from agent.queue.app import create_app, enqueuer
from agent.queue.routing import consumed_queues
from agent.settings import ModelSettings, Settings
from agent.spool.layout import SpoolLayout
from tests.assembly.test_assembler import T0, FakeClock, Recorder, _spool
from tests.support.phantom import PhantomTruth, write_phantom_series


class Rig:
    """An assembler over a fresh spool and database, with the given models and senders."""

    def __init__(self, tmp_path: Path) -> None:
        self.layout = SpoolLayout(tmp_path / "spool")
        self.layout.create()
        self.db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
        self.db.create_schema()
        self.switches = ModelSwitches(self.db)
        self.clock, self.recorder = FakeClock(), Recorder()
        self.tmp = tmp_path

    def assembler(
        self,
        models: tuple[ModelSettings, ...] = (ModelSettings(),),
        *,
        urgent_senders: tuple[str, ...] = (),
        enqueue: Enqueue | None = None,
        stale_after: float | None = None,
    ) -> Assembler:
        return Assembler(
            self.db,
            self.layout,
            quiet_seconds=30,
            models=models,
            enqueue=enqueue or self.recorder,
            clock=self.clock,
            stale_after=stale_after,
            urgent_senders=urgent_senders,
        )

    def study(self, name: str, sender: str = "CT_1") -> PhantomTruth:
        """A small CT series from `sender`, spooled and recorded, a minute ago."""
        truth = write_phantom_series(self.tmp / name, slices=5, rows=32, cols=32)
        for path in truth.files:  # as the receiver records the calling AE title
            ds = pydicom.dcmread(path)
            ds.file_meta.SourceApplicationEntityTitle = sender
            ds.save_as(path, enforce_file_format=True)
        self.db.record_arrivals(_spool(self.layout, list(truth.files), T0))
        self.clock.at = T0 + timedelta(minutes=1)
        return truth

    def manifest(self, study_uid: str) -> Manifest:
        study = self.db.get(study_uid)
        assert study is not None and study.job_id is not None
        return Manifest.from_json(self.layout.manifest_path(study.job_id).read_text())

    def job(self, study_uid: str) -> str:
        study = self.db.get(study_uid)
        assert study is not None and study.job_id is not None
        return study.job_id

    def reason(self, study_uid: str) -> str:
        study = self.db.get(study_uid)
        assert study is not None
        return f"{study.state}: {study.reason}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.db.dispose()


def test_a_study_from_an_urgent_sender_is_urgent(rig: Rig) -> None:
    assembler = rig.assembler(urgent_senders=("ed_ct*", "STROKE"))
    urgent = rig.study("a", sender="ED_CT2")
    normal = rig.study("b", sender="CT_WARD")
    assembler.seal_quiet_studies()
    assert rig.manifest(urgent.study_uid).priority is Priority.URGENT
    assert rig.reason(urgent.study_uid) == "queued: ct-tissue: 5 slices; urgent (sender ED_CT2)"
    assert rig.manifest(normal.study_uid).priority is Priority.NORMAL
    assert rig.reason(normal.study_uid) == "queued: ct-tissue: 5 slices"
    assert len(rig.recorder.jobs) == 2


def test_a_study_an_urgent_model_takes_is_urgent(rig: Rig) -> None:
    models = (ModelSettings(), ModelSettings(name="stroke", priority="urgent"))
    truth = rig.study("a")
    rig.assembler(models).seal_quiet_studies()
    manifest = rig.manifest(truth.study_uid)
    assert manifest.priority is Priority.URGENT and manifest.models == ("ct-tissue", "stroke")
    assert rig.reason(truth.study_uid).endswith("; urgent (model stroke)")


def test_urgent_jobs_are_sent_to_the_urgent_gpu_queue(rig: Rig) -> None:
    app = create_app(Settings(), lambda: pytest.fail("no task runs here"))
    with app.connection_for_write() as conn:
        for queue in consumed_queues("all"):  # the in-memory queues are process-wide
            conn.default_channel.queue_purge(queue)
    assembler = rig.assembler(urgent_senders=("ED_*",), enqueue=enqueuer(app))
    urgent = rig.study("a", sender="ED_CT")
    normal = rig.study("b")
    assembler.seal_quiet_studies()
    jobs = {}
    with app.connection_for_read() as conn:
        for queue in consumed_queues("all"):
            while (message := conn.default_channel.basic_get(queue, no_ack=True)) is not None:
                args, _kwargs, _embed = message.decode()
                jobs[args[0]] = (queue, message.headers["task"])
    assert jobs == {
        rig.job(urgent.study_uid): ("gpu.urgent", "pacs_agent.infer"),
        rig.job(normal.study_uid): ("gpu", "pacs_agent.infer"),
    }


@pytest.mark.parametrize("how", ["configured", "switched"])
def test_a_model_switched_off_takes_nothing(rig: Rig, how: str) -> None:
    model = ModelSettings(state="off") if how == "configured" else ModelSettings()
    if how == "switched":
        rig.switches.set("ct-tissue", "off")
    truth = rig.study("a")
    rig.assembler((model,)).seal_quiet_studies()
    assert rig.reason(truth.study_uid) == "skipped: model ct-tissue is switched off"
    assert rig.recorder.jobs == []


def test_the_other_models_run_without_the_one_switched_off(rig: Rig) -> None:
    rig.switches.set("second", "off")
    truth = rig.study("a")
    rig.assembler((ModelSettings(), ModelSettings(name="second"))).seal_quiet_studies()
    assert rig.manifest(truth.study_uid).models == ("ct-tissue",)
    assert rig.reason(truth.study_uid) == "queued: ct-tissue: 5 slices"
    assert len(rig.recorder.jobs) == 1


def test_a_paused_model_holds_its_studies_until_it_is_on_again(rig: Rig) -> None:
    rig.switches.set("ct-tissue", "paused")
    assembler = rig.assembler(stale_after=60)
    truth = rig.study("a")
    assembler.seal_quiet_studies()
    held = "queued: held: model ct-tissue is paused"
    assert rig.reason(truth.study_uid) == held
    assert rig.manifest(truth.study_uid).models == ("ct-tissue",)
    # Held means not sent: not by the loop, not as a stale job, not on a restart.
    assembler.retry_waiting()
    study = rig.db.get(truth.study_uid)
    assert study is not None
    rig.clock.at = study.updated_at.replace(tzinfo=UTC) + timedelta(days=1)  # long stale
    assembler.requeue_stale()
    rig.assembler().resume(requeue_in_flight=True)
    assert rig.recorder.jobs == []
    assert rig.reason(truth.study_uid) == held

    rig.switches.set("ct-tissue", "on")  # `pacs-agent models on ct-tissue`
    assembler.retry_waiting()
    assert [job for job, _ in rig.recorder.jobs] == [rig.job(truth.study_uid)]
    assert rig.reason(truth.study_uid) == "queued: sent to broker"
    assembler.retry_waiting()
    assert len(rig.recorder.jobs) == 1


def test_a_configured_pause_ends_with_a_reset_or_an_override(rig: Rig) -> None:
    assembler = rig.assembler((ModelSettings(state="paused"),))
    truth = rig.study("a")
    assembler.seal_quiet_studies()
    assert rig.reason(truth.study_uid) == "queued: held: model ct-tissue is paused"
    rig.switches.set("ct-tissue", "paused")
    assert rig.switches.reset("ct-tissue")  # back to the configuration: still paused
    assembler.retry_waiting()
    assert rig.recorder.jobs == []
    rig.switches.set("ct-tissue", "on")
    assembler.retry_waiting()
    assert len(rig.recorder.jobs) == 1


def test_a_retry_asked_while_the_model_is_paused_is_held(rig: Rig) -> None:
    assembler = rig.assembler()
    truth = rig.study("a")
    assembler.seal_quiet_studies()
    study = rig.db.get(truth.study_uid)
    assert study is not None
    rig.db.transition(truth.study_uid, State.FAILED, "inference: boom", expect_job=study.job_id)
    rig.db.transition(
        truth.study_uid, State.QUEUED, f"{RETRY_REQUESTED} (was: x)", expect_job=study.job_id
    )
    rig.recorder.jobs.clear()
    rig.switches.set("ct-tissue", "paused")
    assembler.retry_waiting()
    assert rig.recorder.jobs == []
    assert rig.reason(truth.study_uid) == "queued: held: model ct-tissue is paused"
    rig.switches.reset("ct-tissue")
    assembler.retry_waiting()
    assert len(rig.recorder.jobs) == 1


def test_the_manifest_keeps_the_priority_and_older_ones_are_normal(rig: Rig) -> None:
    assembler = rig.assembler(urgent_senders=("ED_*",))
    truth = rig.study("a", sender="ED_CT")
    assembler.seal_quiet_studies()
    path = rig.layout.manifest_path(rig.job(truth.study_uid))
    text = path.read_text()
    assert '"priority": "urgent"' in text
    assert Manifest.from_json(text).priority is Priority.URGENT
    older = json.loads(text)
    del older["priority"]  # written before priorities existed
    assert Manifest.from_json(json.dumps(older)).priority is Priority.NORMAL
