"""Crash safety with real processes: SIGKILL serve and workers, crash Redis, freeze the PACS.

After each fault the killed process is started again and nobody else acts; the PACS (a real
Orthanc) must then hold every study's source images plus exactly one SEG and one SR.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.db.database import Database
from agent.db.states import State
from agent.settings import load_settings
from agent.spool.layout import SpoolLayout
from tests.support.agent import AgentProcess, agent_database, wait_for_study, write_config
from tests.support.dcmtk import storescu
from tests.support.faults import RedisServer, frozen, kill_hard, modality_counts, wait_until
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

AET = "PACS_AGENT"
QUIET_SECONDS = 2.0
# In-flight studies unchanged this long are sent again (the production default is Redis's
# visibility timeout, an hour; a killed worker's own message comes back only after that).
STALE_AFTER_SECONDS = 4.0
SETTLE_SECONDS = 3.0  # a duplicate still on its way would arrive within this


def _config(folder: Path, port: int, broker_url: str, pacs: Orthanc) -> Path:
    path = write_config(
        folder,
        port=port,
        broker_url=broker_url,
        quiet_seconds=QUIET_SECONDS,
        destinations=[(pacs.aet, "127.0.0.1", pacs.dicom_port)],
    )
    text = path.read_text()
    queue = f"[queue]\nstale_after_seconds = {STALE_AFTER_SECONDS}\ntask_time_limit_seconds = 30\n"
    path.write_text(text.replace("[queue]\n", queue, 1))
    return path


def _state(db: Database, study_uid: str) -> State | None:
    study = db.get(study_uid)
    return None if study is None else State(study.state)


def _spooled(config: Path, study_uid: str) -> int:
    folder = SpoolLayout(load_settings(config).spool.path).study_dir(study_uid)
    return sum(1 for p in folder.rglob("*.dcm")) if folder.is_dir() else 0


def _phantom(folder: Path, seed: int, slices: int = 40, size: int = 128) -> PhantomTruth:
    return write_phantom_series(folder, slices=slices, rows=size, cols=size, seed=seed)


def _assert_once_in_pacs(pacs: Orthanc, truth: PhantomTruth) -> None:
    counts = modality_counts(pacs, truth.study_uid)
    assert counts == {"CT": len(truth.files), "SEG": 1, "SR": 1}, counts


def _finish(db: Database, agent: AgentProcess, studies: list[PhantomTruth], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for truth in studies:
        left = max(1.0, deadline - time.monotonic())
        final = wait_for_study(
            db, truth.study_uid, {State.DONE, State.FAILED}, left, agent.log_tail
        )
        assert final.state == State.DONE, final.reason
        assert final.instance_count == len(truth.files)
    time.sleep(SETTLE_SECONDS)


class BackgroundSend(threading.Thread):
    """storescu in a thread, so that the test can kill the receiver while it sends."""

    def __init__(self, files: list[Path], port: int) -> None:
        super().__init__(daemon=True)
        self.files, self.port = files, port
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self) -> None:
        self.result = storescu(self.files, port=self.port, called_aet=AET, timeout=60, check=False)


@pytest.mark.timeout(180)
def test_serve_killed_while_receiving_after_sealing_and_while_exporting(
    tmp_path: Path, pacs: Orthanc
) -> None:
    truth = _phantom(tmp_path / "ct", seed=1, slices=160, size=128)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)  # the modality's copy
    port = free_port()
    config = _config(tmp_path / "agent", port, "memory://", pacs)
    uid = truth.study_uid
    with agent_database(config) as db:
        # (a) SIGKILL while the study arrives: storescu sees the association break.
        with AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            sender = BackgroundSend(list(truth.files), port)
            sender.start()
            wait_until(lambda: _spooled(config, uid) >= 10, 60, "10 instances spooled")
            kill_hard(serve.process)
            sender.join(60)
        assert sender.result is not None and sender.result.returncode != 0
        assert 10 <= _spooled(config, uid) < len(truth.files)

        # The modality sends the whole study again to the restarted agent; (b) SIGKILL as soon
        # as the study is sealed and its job enqueued (queued, or already being inferred).
        with AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            storescu(list(truth.files), port=port, called_aet=AET)
            in_flight = {State.QUEUED, State.INFERRING}
            wait_until(lambda: _state(db, uid) in in_flight, 60, "study sealed and queued")
            kill_hard(serve.process)
        assert _state(db, uid) in in_flight

        # (b) SIGKILL while exporting: the PACS is frozen, so the C-STORE is under way.
        with frozen(pacs.process), AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            wait_until(lambda: _state(db, uid) == State.EXPORTING, 90, "study exporting")
            time.sleep(1.0)  # the association request is now waiting on the PACS
            kill_hard(serve.process)
        assert _state(db, uid) == State.EXPORTING
        assert modality_counts(pacs, uid) == {"CT": len(truth.files)}

        with AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            _finish(db, serve, [truth], timeout=90)
            serve.assert_running()
    _assert_once_in_pacs(pacs, truth)


@pytest.mark.timeout(180)
def test_workers_killed_mid_inference_and_mid_export_and_pacs_restarted(
    tmp_path: Path, pacs: Orthanc, redis_server: RedisServer
) -> None:
    truth = _phantom(tmp_path / "ct", seed=2, slices=160, size=128)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, redis_server.url, pacs)
    uid = truth.study_uid
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
            wait_until(lambda: _state(db, uid) == State.INFERRING, 60, "inference started")
            kill_hard(gpu.process)
        # Killed mid-inference: no result was recorded, the message is unacknowledged.
        assert _state(db, uid) == State.INFERRING

        with frozen(pacs.process), AgentProcess(config, "worker", "--queue", "gpu") as gpu:
            wait_until(lambda: _state(db, uid) == State.EXPORTING, 90, "inference done")
            time.sleep(1.0)  # the io worker's association request waits on the PACS
            kill_hard(io.process)
            assert _state(db, uid) == State.EXPORTING
        # The PACS goes down for good measure: a clean stop and start, same ports.
        pacs.stop()
        pacs.start()
        assert modality_counts(pacs, uid) == {"CT": len(truth.files)}

        with (
            AgentProcess(config, "worker", "--queue", "gpu") as gpu,
            AgentProcess(config, "worker", "--queue", "io") as io_again,
        ):
            _finish(db, serve, [truth], timeout=90)
            for process in (serve, gpu, io_again):
                process.assert_running()
    _assert_once_in_pacs(pacs, truth)


@pytest.mark.timeout(180)
def test_redis_restarted_while_studies_are_queued(
    tmp_path: Path, pacs: Orthanc, redis_server: RedisServer
) -> None:
    studies = [_phantom(tmp_path / f"ct{i}", seed=10 + i, slices=16, size=64) for i in range(3)]
    for truth in studies:
        storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)
    port = free_port()
    config = _config(tmp_path / "agent", port, redis_server.url, pacs)
    with (
        agent_database(config) as db,
        AgentProcess(config, "serve") as serve,
        AgentProcess(config, "worker", "--queue", "io") as io,
    ):
        serve.wait_listening(port)
        io.wait_log(" ready.")
        for truth in studies:  # no GPU worker yet: the jobs wait in Redis
            storescu(list(truth.files), port=port, called_aet=AET)
        for truth in studies:
            wait_until(lambda t=truth: _state(db, t.study_uid) == State.QUEUED, 60, "study queued")
        redis_server.crash()  # kill -9: the queued messages are gone
        redis_server.start()  # back, empty, on the same port
        with AgentProcess(config, "worker", "--queue", "gpu") as gpu:
            _finish(db, serve, studies, timeout=120)
            for process in (serve, gpu, io):
                process.assert_running()
    assert "stuck queued" in serve.log_path.read_text()
    for truth in studies:
        _assert_once_in_pacs(pacs, truth)
