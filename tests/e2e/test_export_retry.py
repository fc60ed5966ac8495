"""Export faults: a PACS that is down is retried with backoff; one that stays down ends `failed`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.db.database import Database
from agent.db.schema import Study
from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import AgentProcess, serving_agent, wait_for_study
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Sent:
    agent: AgentProcess
    db: Database
    truth: PhantomTruth

    def final(self, timeout: float = 120) -> Study:
        states = {State.DONE, State.FAILED}
        return wait_for_study(self.db, self.truth.study_uid, states, timeout, self.agent.log_tail)


@contextlib.contextmanager
def agent_with_study(tmp_path: Path, size: int = 96, **config: Any) -> Iterator[Sent]:
    """`serve` with this config, a small phantom already sent to it with storescu."""
    truth = write_phantom_series(tmp_path / "ct", slices=24, rows=size, cols=size)
    with serving_agent(tmp_path / "agent", **config) as (agent, db, port):
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        yield Sent(agent, db, truth)


def test_pacs_down_then_up_is_retried_until_done(tmp_path: Path) -> None:
    pacs_port = free_port()  # nothing listens here yet
    with agent_with_study(tmp_path, destinations=[("ORTHANC", "127.0.0.1", pacs_port)]) as sent:
        sent.agent.wait_log("export retrying in", timeout=120)
        study = sent.db.get(sent.truth.study_uid)
        assert study is not None and study.state == State.EXPORTING
        assert "association refused or failed" in study.reason
        pacs = Orthanc()
        pacs.dicom_port = pacs_port
        with pacs:
            done = sent.final(60)
            assert done.state == State.DONE, done.reason
            truth = sent.truth
            fetch_outputs(
                pacs, truth.study_uid, truth.series_uid, set(truth.sop_uids), tmp_path / "out"
            )


def test_pacs_that_stays_down_ends_failed_with_reason(tmp_path: Path) -> None:
    destinations = [("ORTHANC", "127.0.0.1", free_port())]
    with agent_with_study(tmp_path, max_retries=2, destinations=destinations) as sent:
        failed = sent.final()
        assert failed.state == State.FAILED
        assert failed.reason.startswith("export gave up after 3 attempts")
        sent.agent.assert_running()  # the service carries on


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_model_configured_for_missing_cuda_fails_with_reason(tmp_path: Path) -> None:
    cuda_model = '[[models]]\nname = "ct-tissue"\ndevice = "cuda"\n'
    with agent_with_study(tmp_path, size=64, max_retries=1, extra=cuda_model) as sent:
        failed = sent.final()
        assert failed.state == State.FAILED
        assert failed.reason == (
            "inference gave up after 2 attempts: "
            "model ct-tissue is configured for CUDA, which is not available"
        )
        sent.agent.wait_log("inference retrying in")
