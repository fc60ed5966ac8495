"""Pull, watch and verify against a real Orthanc with its DICOMweb plugin, end to end."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from agent.db.database import Database
from agent.db.schema import Transition
from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import AgentProcess, cli, serving_agent, wait_for_study
from tests.support.ci import unavailable
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc, wait_for
from tests.support.phantom import write_phantom_series
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

DEADLINE = 240.0
SENDER = "MODALITY"


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        if not pacs.dicomweb_enabled:
            unavailable("the Orthanc DICOMweb plugin is not installed")
        yield pacs


class Phantom:
    def __init__(self, folder: Path, seed: int) -> None:
        files = list(write_phantom_series(folder, slices=40, seed=seed).files)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        self.files = files
        self.study_uid = str(headers[0].StudyInstanceUID)
        self.series_uid = str(headers[0].SeriesInstanceUID)
        self.sops = {str(h.SOPInstanceUID) for h in headers}

    def upload(self, orthanc: Orthanc) -> None:
        for path in self.files:
            headers = {"Content-Type": "application/dicom"}
            orthanc.request("POST", "/instances", path.read_bytes(), headers=headers)


def _sources(orthanc: Orthanc, web_port: int, *, poll: bool = False, senders: str = "") -> str:
    lines = [
        "[web]",
        'host = "127.0.0.1"',
        f"port = {web_port}",
        "allow_anonymous = true",
        "[[sources]]",
        'name = "orthanc"',
        f'url = "{orthanc.dicomweb_url}"',
        "timeout_seconds = 30",
    ]
    if senders:
        lines.append(f'calling_ae_titles = ["{senders}"]')
    if poll:
        lines += ["[sources.poll]", "interval_seconds = 1", 'modalities = ["CT"]']
    return "\n".join(lines) + "\n"


def _transitions(db: Database, study_uid: str, state: State) -> list[str]:
    study = db.get(study_uid)
    if study is None:
        return []
    with db.session() as s:
        return list(
            s.scalars(
                select(Transition.reason)
                .where(Transition.study_id == study.id, Transition.state == state)
                .order_by(Transition.id)
            )
        )


def _post(url: str, body: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _done(db: Database, study_uid: str, agent: AgentProcess) -> None:
    study = wait_for_study(db, study_uid, {State.DONE, State.FAILED}, DEADLINE, agent.log_tail)
    assert study.state == State.DONE, f"{study.reason}\n{agent.log_tail()}"


def test_submit_pulls_a_study_from_orthanc_and_processes_it(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    study = Phantom(tmp_path / "study", seed=11)
    study.upload(orthanc)
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    web_port = free_port()
    with serving_agent(
        tmp_path / "agent", destinations=[destination], extra=_sources(orthanc, web_port)
    ) as (agent, db, _port):
        config = str(agent.config)
        missing = cli("submit", "--config", config, "--study", "1.2.3.4.5", "--from", "orthanc")
        assert missing.returncode == 1 and "not in orthanc" in missing.stderr, missing
        unknown = cli("submit", "--config", config, "--study", study.study_uid, "--from", "x")
        assert unknown.returncode == 2 and "no source named 'x'" in unknown.stderr

        started = time.monotonic()
        done = cli("submit", "--config", config, "--study", study.study_uid, "--from", "orthanc")
        assert done.returncode == 0, done.stderr
        assert "pulled 40 instances from orthanc" in done.stdout
        assert study.study_uid not in done.stdout  # the study key, not the UID
        _done(db, study.study_uid, agent)
        (complete,) = _transitions(db, study.study_uid, State.COMPLETE)
        assert complete == "pulled from orthanc; 40 instances"
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "out")
        print(f"submit to done: {time.monotonic() - started:.1f} s")

        # The same over HTTP: a study already processed is processed again on request, and
        # the PACS still holds one SEG and one SR (the output UIDs do not change).
        api = f"http://127.0.0.1:{web_port}/api/studies"
        status, answer = _post(f"{api}/1.2.3.4.5/process")
        assert status == 404 and "not in orthanc" in str(answer["error"])
        status, answer = _post(f"{api}/{study.study_uid}/process", {"source": "orthanc"})
        assert status == 202, answer
        assert answer["instances"] == 42  # the 40 images, and the SEG and SR stored since
        wait_for(
            lambda: len(_transitions(db, study.study_uid, State.DONE)) == 2,
            DEADLINE,
            "the study processed a second time",
        )
        assert _transitions(db, study.study_uid, State.FAILED) == []
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "again")
        agent.assert_running()
    assert study.study_uid not in agent.log_path.read_text()


def test_submit_names_a_source_that_is_down(tmp_path: Path) -> None:
    port = free_port()
    dead = f'[[sources]]\nname = "down"\nurl = "http://127.0.0.1:{port}/dicom-web"\n'
    with serving_agent(tmp_path / "agent", extra="[web]\nenabled = false\n" + dead) as (
        agent,
        _db,
        _port,
    ):
        result = cli("submit", "--config", str(agent.config), "--study", "1.2.3.4.5")
        assert result.returncode == 75, result
        assert (
            f"QIDO-RS at down: connection refused at 127.0.0.1:{port}; try again later"
            in result.stderr
        )


def test_poller_processes_a_new_study_once_across_restarts(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    before = Phantom(tmp_path / "before", seed=21)
    before.upload(orthanc)
    study = Phantom(tmp_path / "study", seed=22)
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    extra = _sources(orthanc, free_port(), poll=True)
    with serving_agent(tmp_path / "agent", destinations=[destination], extra=extra) as (
        agent,
        db,
        port,
    ):
        agent.wait_log("watching orthanc")
        study.upload(orthanc)
        _done(db, study.study_uid, agent)
        fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "out")
        time.sleep(3)  # three more polls: the SEG and SR changed the study's count in Orthanc
        assert agent.stop() == 0
        # A restart: what the poller has seen is in the database, nothing is pulled again.
        with AgentProcess(agent.config, "serve") as again:
            again.wait_listening(port)
            time.sleep(4)
            again.assert_running()
        # Recorded on arrival, then marked pulled: once.
        receiving = _transitions(db, study.study_uid, State.RECEIVING)
        assert receiving == ["", "pulled from orthanc: 40 instances"]
        assert len(_transitions(db, study.study_uid, State.COMPLETE)) == 1
        assert len(_transitions(db, study.study_uid, State.DONE)) == 1
        assert db.get(before.study_uid) is None  # there before the watch began: not pulled
    assert "pulled 40 instances from orthanc" in agent.log_path.read_text()
    fetch_outputs(orthanc, study.study_uid, study.series_uid, study.sops, tmp_path / "again")


def test_counts_matched_starts_a_pushed_study_before_the_quiet_period(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    study = Phantom(tmp_path / "study", seed=31)
    study.upload(orthanc)  # the modality sent it to the PACS too
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    extra = _sources(orthanc, free_port(), senders=SENDER)
    with serving_agent(
        tmp_path / "agent", quiet_seconds=60, destinations=[destination], extra=extra
    ) as (agent, db, port):
        storescu(study.files, port=port, called_aet="PACS_AGENT", calling_aet=SENDER)
        _done(db, study.study_uid, agent)
        (complete,) = _transitions(db, study.study_uid, State.COMPLETE)
        assert complete == "counts matched (40 of 40 at orthanc); 40 instances"
