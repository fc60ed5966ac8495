"""Worker faults with real processes, mid-inference: a worker killed or shut down cold, the
database down, the disk full.

The model waits on a gate (tests/support/gated_model.py), so that the fault strikes while the
inference runs; after it, a worker is started again and nobody else acts. The PACS (a real
Orthanc) must then hold the study's images plus exactly one SEG and one SR.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.db.database import Database
from agent.db.states import State
from tests.support.agent import AgentProcess, agent_database, wait_for_study, write_config
from tests.support.dcmtk import storescu
from tests.support.faults import RedisServer, kill_hard, modality_counts, wait_until
from tests.support.gated_model import GatedModel
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port
from tests.support.postgres import Cluster
from tests.support.tmpfs import fill, small_filesystem

pytestmark = pytest.mark.slow

AET = "PACS_AGENT"
LEASE_SECONDS = 3.0
# The promise: running again within 60 s of the cause going away.
RESUME_SECONDS = 60.0


@pytest.fixture
def model(tmp_path: Path) -> GatedModel:
    gated = GatedModel(tmp_path / "model")
    gated.close()
    return gated


def _config(
    folder: Path, port: int, broker: str, pacs: Orthanc, model: GatedModel, database: str = ""
) -> Path:
    path = write_config(
        folder,
        port=port,
        broker_url=broker,
        database_url=database,
        quiet_seconds=1.0,
        destinations=[(pacs.aet, "127.0.0.1", pacs.dicom_port)],
        extra=model.config(),
    )
    text = path.read_text()
    queue = f"[queue]\nlease_seconds = {LEASE_SECONDS}\ntask_time_limit_seconds = 60\n"
    path.write_text(text.replace("[queue]\n", queue, 1))
    return path


def _state(db: Database, study_uid: str) -> str:
    study = db.get(study_uid)
    return "unknown" if study is None else f"{study.state}: {study.reason}"


def _done_once(db: Database, pacs: Orthanc, truth: PhantomTruth, log: AgentProcess) -> None:
    final = wait_for_study(
        db, truth.study_uid, {State.DONE, State.FAILED}, RESUME_SECONDS, log.log_tail
    )
    assert final.state == State.DONE, final.reason
    time.sleep(2.0)  # a duplicate on its way would arrive by now
    counts = modality_counts(pacs, truth.study_uid)
    assert counts == {"CT": len(truth.files), "SEG": 1, "SR": 1}, counts


def _inferring(db: Database, model: GatedModel, truth: PhantomTruth) -> None:
    wait_until(model.started.exists, 90, "the model running")
    assert _state(db, truth.study_uid).startswith("inferring"), _state(db, truth.study_uid)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_worker_shut_down_twice_mid_inference_resumes_after_restart(
    tmp_path: Path, pacs: Orthanc, redis_server: RedisServer, model: GatedModel, how: str
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=48, cols=48)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, redis_server.url, pacs, model)
    sig = getattr(signal, how)
    with (
        agent_database(config) as db,
        AgentProcess(config, "serve") as serve,
        AgentProcess(config, "worker", "--queue", "io") as io,
    ):
        with AgentProcess(config, "worker", "--queue", "gpu") as gpu:
            serve.wait_listening(port)
            gpu.wait_log(" ready.")
            io.wait_log(" ready.")
            storescu(list(truth.files), port=port, called_aet=AET)
            _inferring(db, model, truth)
            assert gpu.process is not None
            gpu.process.send_signal(sig)  # warm shutdown: waits for the task
            time.sleep(0.5)
            gpu.process.send_signal(sig)  # Celery's prompt: "again" is a cold shutdown
            try:
                gpu.process.wait(30)
            except Exception:
                kill_hard(gpu.process)  # a worker that ignores the second signal: kill it
            log = gpu.log_path.read_text()
        assert "failed" not in _state(db, truth.study_uid), _state(db, truth.study_uid)
        assert "kill_job" not in log
        model.open()
        with AgentProcess(config, "worker", "--queue", "gpu"):
            _done_once(db, pacs, truth, serve)


@pytest.mark.timeout(240)
def test_serve_with_its_own_workers_interrupted_twice_mid_inference_resumes_after_restart(
    tmp_path: Path, pacs: Orthanc, model: GatedModel
) -> None:
    """The in-memory broker: `serve` runs the tasks itself, and Ctrl-C twice stops it while
    the model runs. The study must not fail, and the next start must finish it."""
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=48, cols=48)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, "memory://", pacs, model)
    with agent_database(config) as db:
        with AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            storescu(list(truth.files), port=port, called_aet=AET)
            _inferring(db, model, truth)
            assert serve.process is not None
            serve.process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            serve.process.send_signal(signal.SIGINT)
            try:
                serve.process.wait(30)
            except subprocess.TimeoutExpired:
                kill_hard(serve.process)
                raise AssertionError("serve did not stop on the second Ctrl-C") from None
        assert "failed" not in _state(db, truth.study_uid), _state(db, truth.study_uid)
        model.open()
        with AgentProcess(config, "serve") as again:
            again.wait_listening(port)
            _done_once(db, pacs, truth, again)


@pytest.mark.timeout(240)
def test_worker_killed_mid_inference_is_resumed_by_its_lease(
    tmp_path: Path, pacs: Orthanc, redis_server: RedisServer, model: GatedModel
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=48, cols=48)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, redis_server.url, pacs, model)
    with (
        agent_database(config) as db,
        AgentProcess(config, "serve") as serve,
        AgentProcess(config, "worker", "--queue", "io") as io,
    ):
        with AgentProcess(config, "worker", "--queue", "gpu") as gpu:
            serve.wait_listening(port)
            gpu.wait_log(" ready.")
            io.wait_log(" ready.")
            storescu(list(truth.files), port=port, called_aet=AET)
            _inferring(db, model, truth)
            kill_hard(gpu.process)  # an OOM kill: no chance to clean up
        model.open()
        with AgentProcess(config, "worker", "--queue", "gpu"):
            _done_once(db, pacs, truth, serve)


@pytest.mark.timeout(240)
def test_database_down_mid_inference_is_waited_for_then_done(
    tmp_path: Path, pacs: Orthanc, model: GatedModel
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=48, cols=48)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    with Cluster() as database:
        port = free_port()
        config = _config(tmp_path / "agent", port, "memory://", pacs, model, database.url)
        with agent_database(config) as db, AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            storescu(list(truth.files), port=port, called_aet=AET)
            _inferring(db, model, truth)
            db.dispose()
            database.stop()  # down while the model runs
            model.open()
            serve.wait_log("database unavailable", timeout=60)
            time.sleep(3.0)  # a few retries while it stays down
            database.start()
            _done_once(db, pacs, truth, serve)
            log = serve.log_path.read_text()
    assert "study failed" not in log


@pytest.mark.timeout(240)
def test_disk_full_mid_inference_waits_for_space_then_done(
    tmp_path: Path, pacs: Orthanc, model: GatedModel
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=48, cols=48)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, "memory://", pacs, model)
    # No floor on free space: the receiver would refuse the study on so small a filesystem.
    text = config.read_text()
    config.write_text(
        text.replace("[spool]\n", "[spool]\nmin_free_percent = 0\nmin_free_gb = 0\n", 1)
    )
    # The spool on a filesystem of its own; the database beside it, on another.
    with (
        small_filesystem(tmp_path / "agent" / "spool", size_mb=64) as spool,
        agent_database(config) as db,
        AgentProcess(config, "serve") as serve,
    ):
        serve.wait_listening(port)
        storescu(list(truth.files), port=port, called_aet=AET)
        _inferring(db, model, truth)
        filler = fill(spool)
        model.open()
        waiting = "waiting for disk space: results could not be written (no space left on device)"
        wait_until(lambda: waiting in _state(db, truth.study_uid), 60, "waiting for space")
        time.sleep(3.0)  # a few retries while it stays full
        assert _state(db, truth.study_uid) == f"inferring: {waiting}"
        filler.unlink()
        _done_once(db, pacs, truth, serve)
