"""`pacs-agent status --follow`: a study's state changes as they happen, then its end."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.db.database import Database
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.settings import load_settings
from tests.support.agent import write_config
from tests.support.ports import free_port

STUDY = "1.2.826.0.1.3680043.8.498.5"


def _read_line(process: subprocess.Popen[str]) -> str:
    """The next line the follower prints (it flushes at each change; the per-test timeout
    ends a wait for one that never comes)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the follower ended early"
    return line.rstrip("\n")


@pytest.mark.parametrize(("end", "code"), [(State.DONE, 0), (State.FAILED, 1)])
def test_follow_prints_each_state_change_until_the_study_ends(
    tmp_path: Path, end: State, code: int
) -> None:
    config = write_config(tmp_path, port=free_port())
    db = Database(load_settings(config).database_url)
    db.create_schema()
    arrival = ArrivedInstance(
        STUDY,
        STUDY + ".1",
        STUDY + ".1.1",
        "1.2.840.10008.5.1.4.1.1.2",
        tmp_path / "x.dcm",
        datetime.now(UTC),
    )
    [key] = db.record_arrivals([arrival])
    command = [sys.executable, "-m", "agent.cli", "status", "--follow", key[:8]]
    with subprocess.Popen(
        [*command, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    ) as process:
        assert _read_line(process) == f"{key}  following (Ctrl-C stops)"
        assert _read_line(process).endswith("Z  receiving")
        db.transition(STUDY, State.COMPLETE, "1 instances")
        assert _read_line(process).endswith("Z  complete (1 instances)")
        # Two changes between two looks are both printed.
        db.transition(STUDY, State.QUEUED, "", job_id="job-1")
        db.transition(STUDY, State.INFERRING)
        assert _read_line(process).endswith("Z  queued")
        assert _read_line(process).endswith("Z  inferring")
        if end is State.DONE:
            db.transition(STUDY, State.EXPORTING)
            assert _read_line(process).endswith("Z  exporting")
        db.transition(STUDY, end, "the end")
        assert _read_line(process).endswith(f"Z  {end} (the end)")
        assert process.wait(30) == code
        assert process.stderr is not None and process.stderr.read() == ""
    db.dispose()
