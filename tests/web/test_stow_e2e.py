"""End to end through the web port: STOW-RS -> `pacs-agent serve` -> SEG + SR in Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import serving_agent, wait_for_study
from tests.support.data import dicom_files, shared_data
from tests.support.orthanc import Orthanc
from tests.support.ports import free_port, wait_until_listening
from tests.support.web import TOKEN, session

pytestmark = pytest.mark.slow

DEADLINE = 240.0  # seconds from the upload to SEG+SR stored, on a 2-core CI machine


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        yield pacs


def test_stow_rs_upload_ends_with_seg_and_sr_in_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    datasets = [pydicom.dcmread(path) for path in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    series_uid = str(datasets[0].SeriesInstanceUID)
    sops = {str(ds.SOPInstanceUID) for ds in datasets}
    token_file = tmp_path / "secrets" / "stow-token"
    token_file.parent.mkdir()
    token_file.write_text(TOKEN + "\n")
    web_port = free_port()
    web = f'[web]\nhost = "127.0.0.1"\nport = {web_port}\ntokens = [{{ file = "{token_file}" }}]\n'
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)

    with serving_agent(tmp_path / "agent", destinations=[destination], extra=web) as (
        agent,
        db,
        _port,
    ):
        assert agent.process is not None
        wait_until_listening(web_port, timeout=30, pid=agent.process.pid)
        url = f"http://127.0.0.1:{web_port}/dicom-web"

        with session("wrong-token") as wrong, pytest.raises(requests.HTTPError) as refused:
            DICOMwebClient(url, session=wrong).store_instances(datasets[:2])
        assert refused.value.response.status_code == 401
        assert db.get(study_uid) is None
        assert not list((tmp_path / "agent" / "spool" / "studies").glob("*/*/*.dcm"))

        with session() as good:
            result = DICOMwebClient(url, session=good).store_instances(datasets, study_uid)
        assert {str(item.ReferencedSOPInstanceUID) for item in result.ReferencedSOPSequence} == sops
        assert "FailedSOPSequence" not in result

        done = wait_for_study(db, study_uid, {State.DONE, State.FAILED}, DEADLINE, agent.log_tail)
        assert done.state == State.DONE, f"{done.state}: {done.reason}\n{agent.log_tail()}"
        assert done.instance_count == len(files)

    fetch_outputs(orthanc, study_uid, series_uid, sops, tmp_path / "outputs")
    logs = agent.log_path.read_text()
    assert study_uid not in logs and TOKEN not in logs
