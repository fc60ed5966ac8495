"""A study that fails on a damaged instance: its reason names the instance without its UID, in
`pacs-agent status` and in GET /api/studies alike."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from agent.db.states import State
from tests.support.agent import cli, serving_agent, wait_for_study
from tests.support.dcmtk import storescu
from tests.support.phantom import write_phantom_series
from tests.support.ports import free_port
from tests.support.web import session

pytestmark = pytest.mark.slow


def test_decode_failure_reason_names_no_uid(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=64, cols=64)
    damaged = truth.files[5]
    ds = pydicom.dcmread(damaged)
    ds.PixelData = ds.PixelData[:100]  # a frame cut short: the header says 64 x 64
    ds.save_as(damaged, enforce_file_format=True)
    web_port = free_port()
    extra = f'[web]\nhost = "127.0.0.1"\nport = {web_port}\nallow_anonymous = true\n'
    with serving_agent(tmp_path / "agent", extra=extra, max_retries=1) as (agent, db, port):
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        failed = wait_for_study(db, truth.study_uid, {State.FAILED}, 120, agent.log_tail)
        assert "instance " in failed.reason, failed.reason
        status = cli("status", "--config", str(agent.config))
        assert status.returncode == 0, status.stderr
        assert failed.study_key in status.stdout
        listed = session(None).get(f"http://127.0.0.1:{web_port}/api/studies", timeout=30)
        assert listed.status_code == 200
        (row,) = listed.json()["studies"]
        assert row["state"] == "failed" and row["reason"]
        for text in (failed.reason, status.stdout, listed.text):
            for uid in (*truth.sop_uids, truth.series_uid, truth.study_uid):
                assert uid not in text, (uid, text)
