"""Export faults: a PACS that is down is retried with backoff; one that stays down ends `failed`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch

from agent.db import Database, State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import AgentProcess, wait_for_study, write_config
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc
from tests.support.phantom import write_phantom_series
from tests.support.ports import free_port

pytestmark = pytest.mark.slow


def test_pacs_down_then_up_is_retried_until_done(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=24, rows=96, cols=96)
    pacs_port = free_port()  # nothing listens here yet
    port = free_port()
    config = write_config(
        tmp_path / "agent", port=port, destinations=[("ORTHANC", "127.0.0.1", pacs_port)]
    )
    db = Database(f"sqlite:///{tmp_path / 'agent' / 'pacs-agent.db'}")
    with AgentProcess(config, "serve") as agent:
        agent.wait_listening(port)
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        agent.wait_log("export retrying in", timeout=120)
        study = db.get(truth.study_uid)
        assert study is not None and study.state == State.EXPORTING
        assert "association refused or failed" in study.reason
        pacs = Orthanc()
        pacs.dicom_port = pacs_port
        with pacs:
            done = wait_for_study(
                db, truth.study_uid, {State.DONE, State.FAILED}, 60, agent.log_tail
            )
            assert done.state == State.DONE, done.reason
            sops = {
                str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in truth.files
            }
            fetch_outputs(pacs, truth.study_uid, truth.series_uid, sops, tmp_path / "out")
    db.dispose()


def test_pacs_that_stays_down_ends_failed_with_reason(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=24, rows=96, cols=96)
    port = free_port()
    config = write_config(
        tmp_path / "agent",
        port=port,
        max_retries=2,
        destinations=[("ORTHANC", "127.0.0.1", free_port())],
    )
    db = Database(f"sqlite:///{tmp_path / 'agent' / 'pacs-agent.db'}")
    with AgentProcess(config, "serve") as agent:
        agent.wait_listening(port)
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        failed = wait_for_study(
            db, truth.study_uid, {State.DONE, State.FAILED}, 120, agent.log_tail
        )
        assert failed.state == State.FAILED
        assert failed.reason.startswith("export gave up after 3 attempts")
        agent.assert_running()  # the service carries on
    db.dispose()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_model_configured_for_missing_cuda_fails_with_reason(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=64, cols=64)
    port = free_port()
    config = write_config(
        tmp_path / "agent",
        port=port,
        max_retries=1,
        extra='[[models]]\nname = "ct-tissue"\ndevice = "cuda"\n',
    )
    db = Database(f"sqlite:///{tmp_path / 'agent' / 'pacs-agent.db'}")
    with AgentProcess(config, "serve") as agent:
        agent.wait_listening(port)
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        failed = wait_for_study(
            db, truth.study_uid, {State.DONE, State.FAILED}, 120, agent.log_tail
        )
        assert failed.state == State.FAILED
        assert failed.reason == (
            "inference gave up after 2 attempts: "
            "model ct-tissue is configured for CUDA, which is not available"
        )
        agent.wait_log("inference retrying in")
    db.dispose()
