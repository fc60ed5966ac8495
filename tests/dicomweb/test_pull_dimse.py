"""Pull, watch and verify against a real Orthanc as a DICOM peer (C-FIND, C-GET), end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.db.states import State
from tests.dicomweb.test_pull_orthanc import DEADLINE, SENDER, Phantom, _done, _transitions
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import cli, serving_agent
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc, wait_for
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

SOURCE = "orthanc-dimse"


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    # C-GET answers on the caller's own association, so Orthanc needs no modality entry for
    # us; only its default refusal of C-FIND and C-GET from unknown callers is lifted.
    with Orthanc(extra_config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}) as pacs:
        yield pacs


def _source(orthanc: Orthanc, *, poll: bool = False, senders: str = "") -> str:
    lines = [
        "[web]",
        "enabled = false",
        "[[sources]]",
        f'name = "{SOURCE}"',
        'kind = "dimse"',
        f'ae_title = "{orthanc.aet}"',
        'host = "127.0.0.1"',
        f"port = {orthanc.dicom_port}",
        "timeout_seconds = 30",
    ]
    if senders:
        lines.append(f'calling_ae_titles = ["{senders}"]')
    if poll:
        lines += ["[sources.poll]", "interval_seconds = 1", 'modalities = ["CT"]']
    return "\n".join(lines) + "\n"


def test_submit_pulls_a_study_by_c_get_and_processes_it(orthanc: Orthanc, tmp_path: Path) -> None:
    study = Phantom(tmp_path / "study", seed=41)
    study.upload(orthanc)
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    with serving_agent(tmp_path / "agent", destinations=[destination], extra=_source(orthanc)) as (
        agent,
        db,
        _port,
    ):
        config = str(agent.config)
        missing = cli("submit", "--config", config, "--study", "1.2.3.4.5", "--from", SOURCE)
        assert missing.returncode == 1 and f"not in {SOURCE}" in missing.stderr, missing

        started = time.monotonic()
        done = cli("submit", "--config", config, "--study", study.study_uid, "--from", SOURCE)
        assert done.returncode == 0, done.stderr
        assert f"pulled 40 instances from {SOURCE}" in done.stdout
        assert study.study_uid not in done.stdout  # the study key, not the UID
        _done(db, study.study_uid, agent)
        (complete,) = _transitions(db, study.study_uid, State.COMPLETE)
        assert complete == f"pulled from {SOURCE}; 40 instances"
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "out")
        print(f"submit to done: {time.monotonic() - started:.1f} s")

        # Again: the C-GET now brings the SEG and SR back too (their storage classes are
        # negotiated), and the PACS still holds one of each (the output UIDs do not change).
        again = cli("submit", "--config", config, "--study", study.study_uid, "--from", SOURCE)
        assert again.returncode == 0, again.stderr
        assert f"pulled 42 instances from {SOURCE}" in again.stdout
        wait_for(
            lambda: len(_transitions(db, study.study_uid, State.DONE)) == 2,
            DEADLINE,
            "the study processed a second time",
        )
        assert _transitions(db, study.study_uid, State.FAILED) == []
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "again")
        agent.assert_running()
    assert study.study_uid not in agent.log_path.read_text()


def test_submit_names_a_dimse_source_that_is_down(tmp_path: Path) -> None:
    port = free_port()
    dead = (
        '[[sources]]\nname = "down"\nkind = "dimse"\nae_title = "PACS"\n'
        f'host = "127.0.0.1"\nport = {port}\n'
    )
    with serving_agent(tmp_path / "agent", extra="[web]\nenabled = false\n" + dead) as (
        agent,
        _db,
        _port,
    ):
        result = cli("submit", "--config", str(agent.config), "--study", "1.2.3.4.5")
        assert result.returncode == 75, result
        assert (
            f"C-FIND at down: connection refused at 127.0.0.1:{port}; try again later"
            in result.stderr
        )


def test_poller_finds_a_new_study_by_c_find(orthanc: Orthanc, tmp_path: Path) -> None:
    before = Phantom(tmp_path / "before", seed=51)
    before.upload(orthanc)
    study = Phantom(tmp_path / "study", seed=52)
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    with serving_agent(
        tmp_path / "agent", destinations=[destination], extra=_source(orthanc, poll=True)
    ) as (agent, db, _port):
        agent.wait_log(f"watching {SOURCE}")
        study.upload(orthanc)
        _done(db, study.study_uid, agent)
        receiving = _transitions(db, study.study_uid, State.RECEIVING)
        assert receiving == ["", f"pulled from {SOURCE}: 40 instances"]
        assert db.get(before.study_uid) is None  # there before the watch began: not pulled
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "out")


def test_counts_matched_by_c_find_start_a_pushed_study_early(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    study = Phantom(tmp_path / "study", seed=61)
    study.upload(orthanc)  # the modality sent it to the PACS too
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    extra = _source(orthanc, senders=SENDER)
    with serving_agent(
        tmp_path / "agent", quiet_seconds=60, destinations=[destination], extra=extra
    ) as (agent, db, port):
        storescu(study.files, port=port, called_aet="PACS_AGENT", calling_aet=SENDER)
        _done(db, study.study_uid, agent)
        (complete,) = _transitions(db, study.study_uid, State.COMPLETE)
        assert complete == f"counts matched (40 of 40 at {SOURCE}); 40 instances"
