"""STOW-RS export to a real Orthanc with its DICOMweb plugin, through the export outbox."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from agent.db.database import Database
from agent.db.deliveries import Deliveries, ObjectStatus
from agent.dicomweb.client import http_failure
from agent.export import stow
from agent.export.outbox import Outbox
from agent.settings import DestinationSettings
from tests.encode import build_and_save
from tests.support.ci import unavailable
from tests.support.orthanc import Orthanc
from tests.support.phantom import write_phantom_series

pytestmark = pytest.mark.slow

USER, PASSWORD = "agent", "s3cret-stow"


def _orthanc(**extra: object) -> Iterator[Orthanc]:
    pacs = Orthanc(extra_config=extra)
    if not pacs.dicomweb_enabled:
        unavailable("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    with pacs:
        yield pacs


@pytest.fixture
def orthanc() -> Iterator[Orthanc]:
    yield from _orthanc()


@pytest.fixture
def deliveries(tmp_path: Path) -> Iterator[Deliveries]:
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    yield Deliveries(db)
    db.dispose()


def _destination(url: str, **fields: object) -> DestinationSettings:
    return DestinationSettings.model_validate(
        {"name": "web", "kind": "dicomweb", "url": url, "retry_backoff_seconds": 1, **fields}
    )


def _named_by_uid(paths: Sequence[Path], out: Path) -> list[Path]:
    """Copies of `paths` named by SOP Instance UID, as the pipeline's outbox holds them."""
    out.mkdir()
    files = []
    for path in paths:
        target = out / f"{dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm"
        target.write_bytes(path.read_bytes())
        files.append(target)
    return files


def _outbox_files(folder: Path) -> list[Path]:
    """A SEG and an SR in an outbox folder."""
    return _named_by_uid(build_and_save(folder / "built"), folder / "outbox")


def test_seg_and_sr_are_stored_and_come_back_the_same(
    orthanc: Orthanc, deliveries: Deliveries, tmp_path: Path
) -> None:
    files = _outbox_files(tmp_path)
    report = Outbox(deliveries, "PACS_AGENT").deliver(
        "job", files, [_destination(orthanc.dicomweb_url)]
    )
    assert report.delivered == ["web"] and not report.gave_up and not report.waiting
    [view] = deliveries.of_job("job")
    assert [o.status for o in view.objects] == [0, 0]

    client = DICOMwebClient(orthanc.dicomweb_url)
    for path in files:
        sent = dcmread(path)
        back = client.retrieve_instance(
            sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        assert back.SOPClassUID == sent.SOPClassUID
        # Every data element survives the round trip, pixel data (the SEG's frames) included.
        assert {e.tag for e in back} == {e.tag for e in sent}
        for elem in sent:
            if elem.VR != "SQ":
                assert back[elem.tag].value == elem.value, elem.keyword


def test_many_instances_go_in_chunks(
    orthanc: Orthanc, deliveries: Deliveries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=120, rows=32, cols=32)
    files = _named_by_uid(truth.files, tmp_path / "outbox")
    requests_made: list[int] = []
    store = DICOMwebClient.store_instances

    def counting(self: DICOMwebClient, datasets: list[object], *args: object) -> object:
        requests_made.append(len(datasets))
        return store(self, datasets, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DICOMwebClient, "store_instances", counting)
    dest = _destination(orthanc.dicomweb_url, stow_max_instances=50, stow_max_bytes=10**9)
    report = Outbox(deliveries, "PACS_AGENT").deliver("job", files, [dest])
    assert report.delivered == ["web"]
    assert requests_made == [50, 50, 20]
    assert orthanc.instance_count() == 120
    # A byte limit splits as well, and no chunk passes it.
    by_bytes = list(stow._chunks(files, 1000, 25_000))
    assert len(by_bytes) > 1 and sum(map(len, by_bytes)) == 120
    assert all(sum(p.stat().st_size for p in chunk) <= 25_000 for chunk in by_bytes)


def test_wrong_credentials_fail_at_once_and_a_retry_with_the_right_ones_delivers(
    deliveries: Deliveries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _outbox_files(tmp_path)
    for pacs in _orthanc(AuthenticationEnabled=True, RegisteredUsers={USER: PASSWORD}):
        auth = {"kind": "basic", "username": USER, "password": {"env": "STOW_PASSWORD"}}
        dest = _destination(pacs.dicomweb_url, auth=auth)
        monkeypatch.setenv("STOW_PASSWORD", "wrong")
        report = Outbox(deliveries, "PACS_AGENT").deliver("job", files, [dest])
        [why] = report.gave_up
        assert why.startswith("export to web: destination web: STOW-RS: HTTP 401 Unauthorized")
        assert "wrong" not in why
        # The operator fixes the secret and runs `pacs-agent retry`: the ceiling starts anew.
        monkeypatch.setenv("STOW_PASSWORD", PASSWORD)
        deliveries.restart("job")
        report = Outbox(deliveries, "PACS_AGENT").deliver("job", files, [dest])
        assert report.delivered == ["web"], report
        client = DICOMwebClient(pacs.dicomweb_url, session=_basic(USER, PASSWORD))
        sent = dcmread(files[0], stop_before_pixels=True)
        found = client.search_for_instances(study_instance_uid=sent.StudyInstanceUID)
        assert len(found) == 2


def _basic(user: str, password: str) -> requests.Session:
    session = requests.Session()
    session.auth = (user, password)
    return session


def test_a_pacs_stopped_mid_export_is_retried_and_holds_one_copy(
    deliveries: Deliveries, tmp_path: Path
) -> None:
    files = _outbox_files(tmp_path)
    # Orthanc keeps its storage across the restart; one instance per request, so that it can
    # stop between the SEG and the SR.
    pacs = Orthanc(tmp_path / "orthanc")
    if not pacs.dicomweb_enabled:
        unavailable("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    dest = _destination(pacs.dicomweb_url, breaker_failures=10, stow_max_instances=1)
    sent: list[list[str]] = []

    def send_then_stop(
        d: DestinationSettings,
        ae: str,
        paths: Sequence[Path],
        record: Callable[[ObjectStatus], None],
    ) -> None:
        sent.append([p.stem for p in paths])

        def recorded(outcome: ObjectStatus) -> None:
            record(outcome)
            if len(sent) == 1:
                pacs.stop()  # the PACS goes down with the first object stored

        stow.send(d, ae, paths, recorded)

    outbox = Outbox(deliveries, "PACS_AGENT", send=send_then_stop, rng=random.Random(1))
    with pacs:
        down = outbox.deliver("job", files, [dest])
        where = pacs.dicomweb_url.split("/")[2]
        assert [w.reason for w in down.waiting] == [
            f"destination web: STOW-RS: connection refused at {where}"
        ]
        pacs.start()
        assert outbox.deliver("job", files, [dest]).delivered == ["web"]
        # A redelivered task sends nothing again; the PACS holds each object once.
        assert outbox.deliver("job", files, [dest]).delivered == ["web"]
        assert sent == [[f.stem for f in files], [files[1].stem]]
        assert pacs.instance_count() == 2


def _http_error(code: int, body: str = "", **headers: str) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = code
    response.reason = {429: "Too Many Requests", 503: "Service Unavailable"}.get(code, "Oops")
    response._content = body.encode()
    response.headers.update(headers)
    return requests.HTTPError(response=response)


def test_http_failures_are_classified_as_the_issue_says() -> None:
    what = "destination web: STOW-RS"
    busy = http_failure(_http_error(429, **{"Retry-After": "120"}), what)
    assert busy.retryable and busy.retry_after == 120
    assert http_failure(_http_error(503), what).retryable
    assert http_failure(_http_error(500), what).retryable
    assert http_failure(_http_error(408), what).retryable
    assert http_failure(_http_error(409), what).retryable
    refused = http_failure(_http_error(413, "payload too large, max 10 MB"), what)
    assert not refused.retryable
    assert (
        refused.message == "destination web: STOW-RS: HTTP 413 Oops: payload too large, max 10 MB"
    )
    assert not http_failure(_http_error(400), what).retryable
    assert http_failure(requests.ConnectTimeout(), what).retryable
