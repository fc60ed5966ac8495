"""Export faults: a PACS that is down is retried with backoff; one that stays down ends `failed`."""

from __future__ import annotations

import contextlib
import re
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
from tests.support.agent import AgentProcess, cli, serving_agent, wait_for_study
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
        sent.agent.wait_log("export next attempt at", timeout=120)
        study = sent.db.get(sent.truth.study_uid)
        assert study is not None and study.state == State.EXPORTING
        assert re.match(
            r"next attempt at \d\d:\d\d:\d\d UTC \(attempt \d+\): destination pacs0: "
            rf"connection refused at 127\.0\.0\.1:{pacs_port}",
            study.reason,
        ), study.reason
        detail = cli("status", study.study_key, "--config", str(sent.agent.config))
        assert "  to pacs0: 0 of 2 objects stored, " in detail.stdout, detail.stdout
        pacs = Orthanc()
        pacs.dicom_port = pacs_port
        with pacs:
            done = sent.final(60)
            assert done.state == State.DONE, done.reason
            truth = sent.truth
            fetch_outputs(
                pacs, truth.study_uid, truth.series_uid, set(truth.sop_uids), tmp_path / "out"
            )


def test_pacs_that_stays_down_ends_failed_listed_and_retry_sends_it(tmp_path: Path) -> None:
    pacs_port = free_port()
    destinations = [("ORTHANC", "127.0.0.1", pacs_port)]
    with agent_with_study(tmp_path, give_up_after_seconds=6, destinations=destinations) as sent:
        failed = sent.final()
        assert failed.state == State.FAILED
        assert failed.reason.startswith("export to pacs0: gave up after 6 s (")
        assert f"connection refused at 127.0.0.1:{pacs_port}" in failed.reason
        sent.agent.assert_running()  # the service carries on
        config = str(sent.agent.config)
        listed = cli("status", "--failed", "--config", config)
        assert listed.returncode == 0 and failed.study_key in listed.stdout, listed.stderr

        pacs = Orthanc()
        pacs.dicom_port = pacs_port
        with pacs:
            retried = cli("retry", "--all-failed", "--config", config)
            assert retried.returncode == 0, retried.stderr
            assert retried.stdout.split() == [failed.study_key, "queued", "again"]
            done = sent.final(60)
            assert done.state == State.DONE, done.reason
            truth = sent.truth
            fetch_outputs(
                pacs, truth.study_uid, truth.series_uid, set(truth.sop_uids), tmp_path / "out"
            )
            # Inference was not run again: its results were kept with the job.
            log_text = sent.agent.log_path.read_text(errors="replace")
            assert len(re.findall(r"model ct-tissue \S+ finished", log_text)) == 1
        detail = cli("status", failed.study_key, "--config", config)
        assert "to pacs0: 2 of 2 objects stored" in detail.stdout, detail.stdout
        assert detail.stdout.count("0x0000 (Success)") == 2, detail.stdout


def test_retry_refuses_a_study_that_has_not_failed(tmp_path: Path) -> None:
    with agent_with_study(tmp_path) as sent:
        done = sent.final()
        assert done.state == State.DONE
        refused = cli("retry", done.study_key, "--config", str(sent.agent.config))
        assert refused.returncode == 1
        assert f"study {done.study_key} is done; only failed or skipped" in refused.stderr


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
        sent.agent.wait_log("inference next attempt at")
