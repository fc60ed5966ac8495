"""The real peers used by end-to-end tests work: Orthanc, DCMTK storescu/storescp, DICOMweb."""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support.ci import unavailable
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.orthanc import Orthanc
from tests.support.ports import listening_addresses

pytestmark = pytest.mark.slow

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    """One Orthanc for this module; tests only add data, so they do not disturb each other."""
    with Orthanc() as server:
        yield server


@pytest.fixture
def ct_3slice() -> list[Path]:
    """The real 3-slice uncompressed CT from dcmqi."""
    files = dicom_files(shared_data("dcmqi", "ct-3slice"))
    assert len(files) == 3
    return files


@pytest.fixture
def ct_j2k() -> list[Path]:
    """The real 20-slice JPEG 2000 lossless CT (Siemens)."""
    files = dicom_files(shared_data("ct-siemens-j2k"))
    assert len(files) == 20
    return files


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_orthanc_keeps_jpeg2000_sent_by_storescu(
    orthanc: Orthanc, ct_3slice: list[Path], ct_j2k: list[Path]
) -> None:
    storescu([*ct_3slice, *ct_j2k], port=orthanc.dicom_port, called_aet=orthanc.aet)

    for files in (ct_3slice, ct_j2k):
        first = _header(files[0])
        study_id = orthanc.find_study(str(first.StudyInstanceUID))
        assert study_id is not None
        assert study_id in orthanc.studies()
        assert len(orthanc.instances_of_series(str(first.SeriesInstanceUID))) == len(files)
        assert len(orthanc.study_instances(study_id)) == len(files)

    original = pydicom.dcmread(ct_j2k[7])
    assert original.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    instance_id = orthanc.find_instance(str(original.SOPInstanceUID))
    assert instance_id is not None
    stored = pydicom.dcmread(io.BytesIO(orthanc.download_instance(instance_id)))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    assert stored.PixelData == original.PixelData


def test_storescp_receives_files(tmp_path: Path, ct_3slice: list[Path]) -> None:
    with StoreSCP(tmp_path / "received") as scp:
        storescu(ct_3slice, port=scp.port, called_aet=scp.aet)
        received = scp.files()
    assert {str(_header(p).SOPInstanceUID) for p in received} == {
        str(_header(p).SOPInstanceUID) for p in ct_3slice
    }


def test_dicomweb_qido_lists_studies(orthanc: Orthanc, ct_3slice: list[Path]) -> None:
    if not orthanc.dicomweb_enabled:
        message = (
            "Orthanc DICOMweb plugin (libOrthancDicomWeb.so) not found; install orthanc-dicomweb"
        )
        unavailable(message)
    storescu(ct_3slice, port=orthanc.dicom_port, called_aet=orthanc.aet)

    answer = orthanc.request(
        "GET", "/dicom-web/studies", headers={"Accept": "application/dicom+json"}
    )
    study_uids = {study["0020000D"]["Value"][0] for study in json.loads(answer)}
    assert str(_header(ct_3slice[0]).StudyInstanceUID) in study_uids


def test_servers_listen_on_loopback_only(orthanc: Orthanc, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "received") as scp:
        ports = (orthanc.http_port, orthanc.dicom_port, scp.port)
        for port in ports:
            addresses = listening_addresses(port)
            assert addresses
            assert all(ipaddress.ip_address(a).is_loopback for a in addresses), (port, addresses)
