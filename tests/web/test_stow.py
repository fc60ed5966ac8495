"""STOW-RS on the web port over real HTTP on 127.0.0.1: storage, refusals, auth, TLS, memory."""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.audit import close_audit, configure_audit
from agent.receive.handlers import CANNOT_UNDERSTAND, DUPLICATE_SOP_INSTANCE, OUT_OF_RESOURCES
from agent.settings import LoggingSettings, Settings, SpoolSettings, WebUser
from agent.spool.watermark import DiskSpace, Watermark
from agent.web.stow import SOP_CLASS_NOT_SUPPORTED
from tests.support.bombs import GIB, bomb_file
from tests.support.pki import Pki, make_pki
from tests.support.receiver import minimal_ct
from tests.support.web import (
    CONTENT_TYPE,
    TOKEN,
    WebAgent,
    multipart,
    multipart_chunks,
    new_boundary,
    part10,
    secret_file,
    session,
    web_settings,
)

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
SOP_INSTANCE_UID = "00081155"


def _study(count: int) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    datasets = []
    for _ in range(count):
        ds = minimal_ct()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        datasets.append(ds)
    return datasets


def _post(url: str, body: bytes, *, token: str | None = TOKEN, boundary: str) -> requests.Response:
    return session(token).post(
        f"{url}/dicom-web/studies",
        data=body,
        headers={"Content-Type": CONTENT_TYPE.format(boundary=boundary)},
        timeout=60,
    )


def _sops(response: requests.Response, sequence: str) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, failure reason) of each item of one response sequence."""
    items = response.json().get(sequence, {}).get("Value", [])
    found = []
    for item in items:
        uid = item[SOP_INSTANCE_UID].get("Value", [""])[0]
        reason = item.get(FAILURE_REASON, {}).get("Value", [None])[0]
        found.append((uid, reason))
    return found


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[WebAgent]:
    with WebAgent(tmp_path, web_settings(tmp_path)) as web:
        yield web


def test_upload_of_several_instances_is_stored_and_announced(agent: WebAgent) -> None:
    datasets = _study(3)
    boundary = new_boundary()
    response = _post(
        agent.url, multipart([part10(ds) for ds in datasets], boundary), boundary=boundary
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert _sops(response, REFERENCED_SOP_SEQUENCE) == [
        (ds.SOPInstanceUID, None) for ds in datasets
    ]
    assert FAILED_SOP_SEQUENCE not in response.json()
    expected = {
        agent.layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for ds in datasets
    }
    assert set(agent.spooled()) == expected
    assert [a.sop_uid for a in agent.arrivals] == [ds.SOPInstanceUID for ds in datasets]
    assert {a.path for a in agent.arrivals} == expected
    stored = pydicom.dcmread(agent.arrivals[0].path)
    assert stored.SOPInstanceUID == datasets[0].SOPInstanceUID
    assert agent.leftovers() == []


def test_dicomweb_client_stores_into_the_study_path(agent: WebAgent) -> None:
    datasets = _study(2)
    client = DICOMwebClient(f"{agent.url}/dicom-web", session=session())
    result = client.store_instances(datasets, study_instance_uid=datasets[0].StudyInstanceUID)

    stored = [str(item.ReferencedSOPInstanceUID) for item in result.ReferencedSOPSequence]
    assert stored == [ds.SOPInstanceUID for ds in datasets]
    assert len(agent.spooled()) == 2


def test_a_bad_part_among_good_ones_is_named_and_the_rest_stored(agent: WebAgent) -> None:
    good = _study(2)
    no_series = minimal_ct()
    del no_series.SeriesInstanceUID
    not_storage = minimal_ct()
    not_storage.SOPClassUID = not_storage.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.1"
    garbage = b"\0" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\xff\xff"
    parts = [part10(good[0]), part10(no_series), garbage, part10(not_storage), part10(good[1])]
    boundary = new_boundary()
    response = _post(agent.url, multipart(parts, boundary), boundary=boundary)

    assert response.status_code == 202, response.text
    assert _sops(response, REFERENCED_SOP_SEQUENCE) == [(ds.SOPInstanceUID, None) for ds in good]
    failed = _sops(response, FAILED_SOP_SEQUENCE)
    assert failed[0] == (no_series.SOPInstanceUID, 0xC001)
    assert failed[1][1] == CANNOT_UNDERSTAND
    assert failed[2] == (not_storage.SOPInstanceUID, SOP_CLASS_NOT_SUPPORTED)
    assert len(agent.spooled()) == 2 and len(agent.arrivals) == 2
    assert agent.leftovers() == []


def test_an_instance_of_another_study_is_refused_on_the_study_path(agent: WebAgent) -> None:
    mine, other = _study(1)[0], _study(1)[0]
    boundary = new_boundary()
    response = session().post(
        f"{agent.url}/dicom-web/studies/{mine.StudyInstanceUID}",
        data=multipart([part10(mine), part10(other)], boundary),
        headers={"Content-Type": CONTENT_TYPE.format(boundary=boundary)},
        timeout=60,
    )
    assert response.status_code == 202
    assert _sops(response, FAILED_SOP_SEQUENCE) == [(other.SOPInstanceUID, 0xA900)]
    assert [a.sop_uid for a in agent.arrivals] == [mine.SOPInstanceUID]


def test_nothing_stored_is_409(agent: WebAgent) -> None:
    ds = minimal_ct()
    del ds.StudyInstanceUID
    boundary = new_boundary()
    response = _post(agent.url, multipart([part10(ds)], boundary), boundary=boundary)
    assert response.status_code == 409
    assert _sops(response, FAILED_SOP_SEQUENCE)[0][1] == 0xC001
    assert agent.spooled() == [] and agent.arrivals == []


def test_wrong_token_is_401_and_nothing_stored(agent: WebAgent, tmp_path: Path) -> None:
    configure_audit(Settings(logging=LoggingSettings(audit_file=str(tmp_path / "audit.log"))))
    try:
        boundary = new_boundary()
        body = multipart([part10(ds) for ds in _study(2)], boundary)
        response = _post(agent.url, body, token="not-the-token", boundary=boundary)
    finally:
        close_audit()
    assert response.status_code == 401
    assert 'Bearer realm="pacs-agent"' in response.headers["www-authenticate"]
    assert agent.spooled() == [] and agent.arrivals == [] and agent.leftovers() == []
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "login-refused" and entry["source"]["address"] == "127.0.0.1"
    assert "not-the-token" not in line and TOKEN not in line


def test_without_credentials_configured_everything_but_health_is_401(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with WebAgent(tmp_path, web_settings(tmp_path, tokens=())) as agent:
        assert "every request but /api/health is refused" in caplog.text
        boundary = new_boundary()
        response = _post(agent.url, multipart([part10(minimal_ct())], boundary), boundary=boundary)
        assert response.status_code == 401
        assert session(None).get(f"{agent.url}/api/studies", timeout=10).status_code == 401
        health = session(None).get(f"{agent.url}/api/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert agent.spooled() == []


def test_anonymous_when_allowed_but_wrong_credentials_still_refused(tmp_path: Path) -> None:
    with WebAgent(tmp_path, web_settings(tmp_path, allow_anonymous=True)) as agent:
        boundary = new_boundary()
        body = multipart([part10(minimal_ct())], boundary)
        assert _post(agent.url, body, token=None, boundary=boundary).status_code == 200
        assert _post(agent.url, body, token="wrong", boundary=boundary).status_code == 401


def test_basic_auth(tmp_path: Path) -> None:
    user = WebUser(username="modality", password=secret_file(tmp_path, "pw", "pass:word"))
    with WebAgent(tmp_path, web_settings(tmp_path, tokens=(), users=(user,))) as agent:
        boundary = new_boundary()
        body = multipart([part10(minimal_ct())], boundary)
        s = session(None)
        s.auth = ("modality", "pass:word")
        url = f"{agent.url}/dicom-web/studies"
        headers = {"Content-Type": CONTENT_TYPE.format(boundary=boundary)}
        assert s.post(url, data=body, headers=headers, timeout=30).status_code == 200
        s.auth = ("modality", "wrong")
        refused = s.post(url, data=body, headers=headers, timeout=30)
        assert refused.status_code == 401
        assert "Basic" in refused.headers["www-authenticate"]
        bad = base64.b64encode(b"no colon").decode()
        headers["Authorization"] = f"Basic {bad}"
        assert session(None).post(url, data=body, headers=headers, timeout=30).status_code == 401
        assert len(agent.arrivals) == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=abc',
        "multipart/form-data; boundary=abc",
    ],
)
def test_wrong_content_type_is_415(agent: WebAgent, content_type: str) -> None:
    response = session().post(
        f"{agent.url}/dicom-web/studies",
        data=part10(minimal_ct()),
        headers={"Content-Type": content_type},
        timeout=30,
    )
    assert response.status_code == 415
    assert agent.spooled() == []


@pytest.mark.parametrize("cut", ["in the second part", "before the closing boundary"])
def test_truncated_body_is_400_and_nothing_stored(agent: WebAgent, cut: str) -> None:
    boundary = new_boundary()
    body = multipart([part10(ds) for ds in _study(2)], boundary)
    end = len(body) // 2 + 200 if cut == "in the second part" else body.rindex(b"\r\n--")
    response = _post(agent.url, body[:end], boundary=boundary)
    assert response.status_code == 400
    assert agent.spooled() == [] and agent.arrivals == [] and agent.leftovers() == []


def test_spool_low_is_503_with_retry_after(tmp_path: Path) -> None:
    watermark = Watermark(
        tmp_path,
        min_free_percent=10,
        min_free_bytes=0,
        probe=lambda _path: DiskSpace(free_bytes=1, total_bytes=100),
    )
    with WebAgent(tmp_path, web_settings(tmp_path), watermark) as agent:
        boundary = new_boundary()
        response = _post(agent.url, multipart([part10(minimal_ct())], boundary), boundary=boundary)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert agent.spooled() == []


def test_size_limits(tmp_path: Path) -> None:
    big, small = minimal_ct(), minimal_ct()
    big.add_new(0x7FE00010, "OB", b"\0" * 200_000)  # PixelData
    web = web_settings(tmp_path, max_request_bytes=1_000_000)
    receiver = {"receiver": {"max_instance_bytes": 100_000}}
    with WebAgent(tmp_path, web, **receiver) as agent:
        boundary = new_boundary()
        response = _post(
            agent.url, multipart([part10(big), part10(small)], boundary), boundary=boundary
        )
        assert response.status_code == 202
        assert _sops(response, FAILED_SOP_SEQUENCE) == [(big.SOPInstanceUID, OUT_OF_RESOURCES)]
        too_much = multipart([part10(small)] * 2 + [b"\0" * 1_000_000], boundary)
        assert _post(agent.url, too_much, boundary=boundary).status_code == 413
        assert [a.sop_uid for a in agent.arrivals] == [small.SOPInstanceUID]
        assert agent.leftovers() == []


def test_studies_api_lists_keys_not_uids(agent: WebAgent) -> None:
    health = session(None).get(f"{agent.url}/api/health", timeout=10).json()
    assert health["spool"] == "ok"
    response = session().get(f"{agent.url}/api/studies?limit=5", timeout=10)
    assert response.status_code == 200 and response.json() == {"studies": []}
    assert session().get(f"{agent.url}/api/studies?limit=0", timeout=10).status_code == 400


def _pixel_data_header(length: int) -> bytes:
    # (7FE0,0010) OB, explicit VR little endian: tag, VR, two reserved bytes, 4-byte length.
    return struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", length)


def test_large_upload_streams_to_disk_not_memory(agent: WebAgent) -> None:
    size = 200 * 1024 * 1024
    ds = minimal_ct()
    head = part10(ds) + _pixel_data_header(size)
    chunk = b"\0" * (1024 * 1024)
    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        yield from multipart_chunks([[head, *(chunk for _ in range(size // len(chunk)))]], boundary)

    process = psutil.Process(os.getpid())
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = _post(agent.url, body(), boundary=boundary)  # type: ignore[arg-type]
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    (path,) = agent.spooled()
    assert path.stat().st_size == len(head) + size
    # The server and the client share this process; together they held a few chunks at most.
    assert peak - baseline < 64 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_on_the_web_port(tmp_path: Path, pki: Pki) -> None:
    tls = {"certificate": pki.server_cert, "private_key": pki.server_key}
    with WebAgent(tmp_path, web_settings(tmp_path, tls=tls)) as agent:
        assert agent.url.startswith("https://")
        url = agent.url.replace("127.0.0.1", "localhost")  # the name in the certificate
        # Sessions are closed before the server stops: an idle TLS connection would make it
        # wait for the client's close_notify.
        with session(verify=str(pki.ca)) as trusting:
            ds = minimal_ct()
            DICOMwebClient(f"{url}/dicom-web", session=trusting).store_instances([ds])
        assert [a.sop_uid for a in agent.arrivals] == [ds.SOPInstanceUID]
        with session(verify=str(pki.other_ca)) as s, pytest.raises(requests.exceptions.SSLError):
            s.get(f"{url}/api/health", timeout=10)
        plain = agent.url.replace("https://", "http://")
        with session() as s, pytest.raises(requests.exceptions.ConnectionError):
            s.get(f"{plain}/api/health", timeout=10)


def test_settings_keep_secrets_out_of_repr(tmp_path: Path) -> None:
    web = web_settings(tmp_path)
    assert TOKEN not in repr(web) and TOKEN not in repr(Settings(spool=SpoolSettings(), web=web))


def test_a_deflate_bomb_is_refused_as_over_the_limit(tmp_path: Path) -> None:
    limit = 64 * 1024 * 1024
    bomb, good = minimal_ct(), minimal_ct()
    receiver = {"receiver": {"max_instance_bytes": limit}}
    with WebAgent(tmp_path, web_settings(tmp_path), **receiver) as agent:
        boundary = new_boundary()
        parts = [bomb_file(tmp_path / "bomb.dcm", bomb, 2 * GIB).read_bytes(), part10(good)]
        response = _post(agent.url, multipart(parts, boundary), boundary=boundary)
        assert response.status_code == 202
        assert _sops(response, FAILED_SOP_SEQUENCE) == [(bomb.SOPInstanceUID, OUT_OF_RESOURCES)]
        assert [a.sop_uid for a in agent.arrivals] == [good.SOPInstanceUID]
        assert agent.leftovers() == []


def test_an_instance_in_another_series_of_its_study_is_refused_as_a_duplicate(
    agent: WebAgent,
) -> None:
    """The same SOP Instance UID in a second series of the study: Failure Reason 0x0111
    (PS3.18 I.2.2 takes the C-STORE statuses), nothing stored beside the first copy; in the
    same series it is a re-send, stored."""
    (first,) = _study(1)
    moved = minimal_ct()
    moved.StudyInstanceUID, moved.SOPInstanceUID = first.StudyInstanceUID, first.SOPInstanceUID
    again = minimal_ct()
    again.StudyInstanceUID, again.SeriesInstanceUID = (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
    )
    again.SOPInstanceUID = first.SOPInstanceUID
    for ds in (first, moved, again):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    boundary = new_boundary()
    assert _post(agent.url, multipart([part10(first)], boundary), boundary=boundary).ok
    boundary = new_boundary()
    body = multipart([part10(moved), part10(again)], boundary)
    response = _post(agent.url, body, boundary=boundary)

    assert response.status_code == 202, response.text
    assert _sops(response, FAILED_SOP_SEQUENCE) == [(first.SOPInstanceUID, DUPLICATE_SOP_INSTANCE)]
    assert _sops(response, REFERENCED_SOP_SEQUENCE) == [(first.SOPInstanceUID, None)]
    assert [a.series_uid for a in agent.arrivals] == [first.SeriesInstanceUID] * 2
    assert len(agent.spooled()) == 1
    assert agent.leftovers() == []


def test_an_uploaded_instance_carries_the_digest_of_its_accession_number(
    agent: WebAgent,
) -> None:
    from agent.logs import accession_digest

    [ds] = _study(1)
    ds.AccessionNumber = "RAD-7"
    boundary = new_boundary()
    response = _post(agent.url, multipart([part10(ds)], boundary), boundary=boundary)
    assert response.status_code == 200, response.text
    assert [a.accession_hash for a in agent.arrivals] == [accession_digest("RAD-7")]
