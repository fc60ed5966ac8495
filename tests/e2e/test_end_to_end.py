"""End to end: storescu -> pacs-agent -> Orthanc, embedded broker and Redis workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from agent.db.database import Database
from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support import viewers
from tests.support.agent import (
    AgentProcess,
    agent_database,
    cli,
    serving_agent,
    wait_for_study,
    write_config,
)
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

DEADLINE = 240.0  # seconds from the last instance sent to SEG+SR stored, on a 2-core CI machine


@dataclass(frozen=True)
class Study:
    files: list[Path]
    study_uid: str
    series_uid: str
    sops: set[str]


def _study(files: list[Path]) -> Study:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return Study(
        files,
        str(headers[0].StudyInstanceUID),
        str(headers[0].SeriesInstanceUID),
        {str(h.SOPInstanceUID) for h in headers},
    )


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        yield pacs


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    return write_phantom_series(tmp_path_factory.mktemp("phantom"), slices=110)


def _check_phantom(orthanc: Orthanc, truth: PhantomTruth, folder: Path) -> None:
    study = _study(list(truth.files))
    out = fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, folder)
    seg_volumes = out.seg_volumes_ml()
    sr_volumes = out.sr_volumes_ml()
    for label, expected in truth.volumes_ml.items():
        assert seg_volumes[label] == pytest.approx(expected, rel=0.05), label
        assert sr_volumes[label] == pytest.approx(seg_volumes[label], rel=1e-6), label


def _run_scenario(
    agent: AgentProcess,
    db: Database,
    orthanc: Orthanc,
    port: int,
    phantom: PhantomTruth,
    tmp_path: Path,
) -> None:
    ct = _study(dicom_files(shared_data("ct-siemens-j2k")))
    mr = _study(dicom_files(shared_data("pacsman-dummy-mr")))
    ph = _study(list(phantom.files))
    for study in (ct, ph, mr):
        storescu(study.files, port=port, called_aet="PACS_AGENT")
    sent = time.monotonic()

    skipped = wait_for_study(db, mr.study_uid, {State.SKIPPED}, DEADLINE, agent.log_tail)
    assert "no CT series" in skipped.reason
    for study in (ct, ph):
        done = wait_for_study(
            db,
            study.study_uid,
            {State.DONE, State.FAILED},
            DEADLINE - (time.monotonic() - sent),
            agent.log_tail,
        )
        assert done.state == State.DONE, f"{done.state}: {done.reason}\n{agent.log_tail()}"

    sent_ct = fetch_outputs(orthanc, ct.study_uid, ct.series_uid, ct.sops, tmp_path / "ct")
    if viewers.wanted():
        # What OHIF and Cornerstone3D make of what the agent sent (skipped without Node here).
        viewers.assert_viewers_load(sent_ct.seg_path, sent_ct.sr_path, ct.files, tmp_path)
    _check_phantom(orthanc, phantom, tmp_path / "phantom")
    assert orthanc.find_study(mr.study_uid) is None  # nothing was sent for the skipped study

    status = cli("status", "--config", str(agent.config))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("done") >= 2 and "skipped (ct-tissue: no CT series" in status.stdout
    for uid in (ct.study_uid, ph.study_uid, mr.study_uid):
        assert uid not in status.stdout  # study keys only, no identifiers
    logs = agent.log_path.read_text()
    for identity in ("PHANTOM^CT", "PHANTOM-001", "TS-EXAMPLE-CT", "TOTALSEGMENTATOR"):
        assert identity not in logs and identity not in status.stdout


def test_embedded_broker_end_to_end(
    orthanc: Orthanc, phantom: PhantomTruth, tmp_path: Path
) -> None:
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    with serving_agent(tmp_path / "agent", destinations=[destination]) as (agent, db, port):
        _run_scenario(agent, db, orthanc, port, phantom, tmp_path)
        assert agent.stop() == 0


def test_redis_broker_with_separate_workers(
    orthanc: Orthanc, phantom: PhantomTruth, tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    import redis
    from sqlalchemy import create_engine

    from agent.db.schema import Base

    redis.Redis.from_url(redis_url).flushdb()
    engine = create_engine(postgres_url)
    Base.metadata.drop_all(engine)
    engine.dispose()

    port = free_port()
    config = write_config(
        tmp_path / "agent",
        port=port,
        broker_url=redis_url,
        database_url=postgres_url,
        destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
    )
    # Inference and export run in separate worker processes, as on a GPU host and an IO host.
    with (
        agent_database(config) as db,
        AgentProcess(config, "worker", "--queue", "gpu") as gpu,
        AgentProcess(config, "worker", "--queue", "io") as io,
        AgentProcess(config, "serve") as agent,
    ):
        agent.wait_listening(port)
        # Celery's own line, e.g. "worker-gpu-1a2b3c@host ready." ("already" must not match).
        gpu.wait_log(" ready.")
        io.wait_log(" ready.")
        _run_scenario(agent, db, orthanc, port, phantom, tmp_path)
        for process in (agent, gpu, io):
            process.assert_running()
    gpu_log, io_log = gpu.log_path.read_text(), io.log_path.read_text()
    assert "model ct-tissue" in gpu_log and "sent 2 objects" not in gpu_log
    assert "sent 2 objects" in io_log


def test_restart_before_completion_finishes_once(orthanc: Orthanc, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "series", slices=100, seed=7)
    study = _study(list(truth.files))
    port = free_port()
    config = write_config(
        tmp_path / "agent",
        port=port,
        quiet_seconds=6,
        destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
    )
    with agent_database(config) as db:
        with AgentProcess(config, "serve") as first:
            first.wait_listening(port)
            storescu(study.files, port=port, called_aet="PACS_AGENT")
            # Every instance is acknowledged; the study is not complete yet. Crash hard.
            first.kill()
        row = db.get(study.study_uid)
        assert row is None or row.state == State.RECEIVING
        assert orthanc.find_study(study.study_uid) is None

        with AgentProcess(config, "serve") as second:
            second.wait_listening(port)
            done = wait_for_study(
                db, study.study_uid, {State.DONE, State.FAILED}, DEADLINE, second.log_tail
            )
            assert done.state == State.DONE, done.reason
            assert done.instance_count == len(study.files)
            time.sleep(2)  # anything sent twice would have arrived by now
    _check_phantom(orthanc, truth, tmp_path / "out")
