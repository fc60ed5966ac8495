"""Faults while a study arrives, with real processes: the database stops, the sender aborts
(its association, or its STOW-RS request).

Each ends with exactly one SEG and one SR in the PACS (a real Orthanc), built from the whole
study, without anybody acting but the sender re-sending what it was not acknowledged.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import AgentProcess, agent_database, wait_for_study, write_config
from tests.support.dcmtk import storescu
from tests.support.faults import modality_counts, wait_until
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port, wait_until_listening
from tests.support.postgres import Cluster
from tests.support.web import (
    CONTENT_TYPE,
    TOKEN,
    multipart,
    new_boundary,
    send_cut_off,
    session,
)

pytestmark = pytest.mark.slow

AET = "PACS_AGENT"
SLICES = 60


@pytest.fixture
def study(tmp_path: Path, pacs: Orthanc) -> PhantomTruth:
    truth = write_phantom_series(tmp_path / "ct", slices=SLICES, rows=64, cols=64, seed=7)
    storescu(list(truth.files), port=pacs.dicom_port, called_aet=pacs.aet)  # the modality's copy
    return truth


def _config(
    folder: Path, port: int, pacs: Orthanc, database_url: str = "", extra: str = ""
) -> Path:
    return write_config(
        folder,
        port=port,
        database_url=database_url,
        quiet_seconds=2.0,
        destinations=[(pacs.aet, "127.0.0.1", pacs.dicom_port)],
        extra=extra,
    )


def _assert_one_result_from_the_whole_study(
    pacs: Orthanc, truth: PhantomTruth, folder: Path
) -> None:
    assert modality_counts(pacs, truth.study_uid) == {"CT": SLICES, "SEG": 1, "SR": 1}
    outputs = fetch_outputs(
        pacs, truth.study_uid, truth.series_uid, set(truth.sop_uids), folder / "outputs"
    )
    (series,) = outputs.seg.ReferencedSeriesSequence
    assert len(series.ReferencedInstanceSequence) == SLICES


@pytest.mark.timeout(240)
def test_postgresql_stopped_while_a_study_arrives_loses_no_instance(
    tmp_path: Path, pacs: Orthanc, study: PhantomTruth
) -> None:
    port = free_port()
    with Cluster() as cluster:
        config = _config(tmp_path / "agent", port, pacs, cluster.url)
        with agent_database(config) as db, AgentProcess(config, "serve") as serve:
            serve.wait_listening(port)
            files = list(study.files)
            storescu(files[: SLICES // 2], port=port, called_aet=AET)
            cluster.stop()
            # Acknowledged while the database is down: the receiver never waits on it.
            storescu(files[SLICES // 2 :], port=port, called_aet=AET)
            serve.wait_log("database unavailable")
            time.sleep(4)  # longer than the quiet period
            cluster.start()
            final = wait_for_study(
                db, study.study_uid, {State.DONE, State.FAILED}, 120, serve.log_tail
            )
            assert final.state == State.DONE, final.reason
            assert final.instance_count == SLICES
            serve.wait_log("database available again")
            time.sleep(3)  # a second revision, were one coming, would be sent by now
            serve.assert_running()
    _assert_one_result_from_the_whole_study(pacs, study, tmp_path)


def _send_then_abort(files: list[Path], port: int) -> None:
    """A sender whose association breaks (A-ABORT) after these instances."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.abort()


@pytest.mark.timeout(240)
def test_an_aborted_association_waits_for_the_re_send_and_gives_one_result(
    tmp_path: Path, pacs: Orthanc, study: PhantomTruth
) -> None:
    port = free_port()
    config = _config(tmp_path / "agent", port, pacs, extra="")
    text = config.read_text().replace("[study]\n", "[study]\nsender_retry_seconds = 120\n", 1)
    config.write_text(text)
    files = list(study.files)
    with agent_database(config) as db, AgentProcess(config, "serve") as serve:
        serve.wait_listening(port)
        _send_then_abort(files[: SLICES // 2], port)

        def waiting() -> bool:
            found = db.get(study.study_uid)
            return found is not None and found.reason.startswith("waiting up to 120 s")

        wait_until(waiting, 30, "the study waiting for the sender")
        time.sleep(4)  # twice the quiet period: still waiting, nothing sealed
        found = db.get(study.study_uid)
        assert found is not None and found.state == State.RECEIVING
        assert "association aborted after 30 instances" in found.reason

        storescu(files, port=port, called_aet=AET)  # the sender's retry: the whole study
        final = wait_for_study(db, study.study_uid, {State.DONE, State.FAILED}, 120, serve.log_tail)
        assert final.state == State.DONE, final.reason
        assert final.instance_count == SLICES
        assert "partial" not in final.reason
        time.sleep(3)
    _assert_one_result_from_the_whole_study(pacs, study, tmp_path)


def _stow(url: str, files: list[Path]) -> None:
    """One STOW-RS request of these files, every one stored."""
    boundary = new_boundary()
    response = session().post(
        f"{url}/dicom-web/studies",
        data=multipart([path.read_bytes() for path in files], boundary),
        headers={"Content-Type": CONTENT_TYPE.format(boundary=boundary)},
        timeout=60,
    )
    assert response.status_code == 200, response.text


@pytest.mark.timeout(240)
def test_a_stow_rs_request_cut_off_waits_for_the_re_send_and_gives_one_result(
    tmp_path: Path, pacs: Orthanc, study: PhantomTruth
) -> None:
    port, web_port = free_port(), free_port()
    token = tmp_path / "secrets" / "stow-token"
    token.parent.mkdir()
    token.write_text(TOKEN + "\n")
    web = f'[web]\nhost = "127.0.0.1"\nport = {web_port}\ntokens = [{{ file = "{token}" }}]\n'
    config = _config(tmp_path / "agent", port, pacs, extra=web)
    text = config.read_text().replace("[study]\n", "[study]\nsender_retry_seconds = 120\n", 1)
    config.write_text(text)
    files = list(study.files)
    url = f"http://127.0.0.1:{web_port}"
    with agent_database(config) as db, AgentProcess(config, "serve") as serve:
        serve.wait_listening(port)
        assert serve.process is not None
        wait_until_listening(web_port, timeout=30, pid=serve.process.pid)
        _stow(url, files[: SLICES // 2])
        # The second half's request, cut off after 10 of its 30 instances: none of it stored.
        parts = [path.read_bytes() for path in files[SLICES // 2 :]]
        send_cut_off(web_port, tmp_path / "agent" / "spool" / "tmp", parts, complete=10)

        def waiting() -> bool:
            found = db.get(study.study_uid)
            return found is not None and found.reason.startswith("waiting up to 120 s")

        wait_until(waiting, 30, "the study waiting for the sender")
        time.sleep(4)  # twice the quiet period: still waiting, nothing sealed
        found = db.get(study.study_uid)
        assert found is not None and found.state == State.RECEIVING
        assert found.instance_count == SLICES // 2
        assert "STOW-RS request cut off after 10 instances" in found.reason

        _stow(url, files)  # the sender's retry: the whole study
        final = wait_for_study(db, study.study_uid, {State.DONE, State.FAILED}, 120, serve.log_tail)
        assert final.state == State.DONE, final.reason
        assert final.instance_count == SLICES
        assert "partial" not in final.reason
        time.sleep(3)
    _assert_one_result_from_the_whole_study(pacs, study, tmp_path)
