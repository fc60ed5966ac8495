"""The export outbox: per-object records, backoff with jitter, the circuit breaker, the ceiling.

The delivery records live in a real database (SQLite and PostgreSQL); the sends are either a
stand-in that answers as told or, for the statuses, a real pynetdicom Storage SCP.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from agent.audit import AUDIT_LOGGER
from agent.db.deliveries import Deliveries, ObjectStatus
from agent.errors import RetryableError
from agent.export.outbox import Outbox, backoff
from agent.settings import DestinationSettings


def _destination(name: str = "pacs", port: int = 11112, **fields: object) -> DestinationSettings:
    return DestinationSettings.model_validate(
        {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": port, **fields}
    )


def _object(folder: Path, sop_class: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG" if sop_class == SegmentationStorage else "SR"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"  # the outbox names objects by SOP Instance UID
    ds.save_as(path, enforce_file_format=True)
    return path


class Stand:
    """A destination stand-in: answers each object with the next scripted status, or fails."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.script: list[int | str] = []  # a status per object sent, or an error to raise

    def __call__(
        self,
        dest: DestinationSettings,
        calling_ae: str,
        files: Sequence[Path],
        record: Callable[[ObjectStatus], None],
    ) -> None:
        self.calls.append([p.stem for p in files])
        for path in files:
            step = self.script.pop(0) if self.script else 0x0000
            if isinstance(step, str):
                raise RetryableError(step)
            record(ObjectStatus(path.stem, "1.2.840.10008.5.1.4.1.1.66.4", step))


def _outbox(deliveries: Deliveries, stand: Stand, now: datetime | None = None) -> Outbox:
    clock = (lambda: now) if now is not None else (lambda: datetime.now(UTC))
    return Outbox(deliveries, "PACS_AGENT", send=stand, rng=random.Random(7), clock=clock)


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(1)
    for attempt, step in [(1, 10), (2, 20), (3, 40), (7, 600), (30, 600)]:
        waits = [backoff(attempt, 10, 600, rng) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits)
        assert max(waits) - min(waits) > step / 4  # spread, not one value


def test_a_broken_association_resumes_with_the_objects_not_yet_stored(
    deliveries: Deliveries, files: list[Path]
) -> None:
    stand = Stand()
    stand.script = [0x0000, "destination pacs: connection lost"]
    dest = _destination()
    first = _outbox(deliveries, stand).deliver("job-1", files, [dest])
    assert first.delivered == [] and len(first.waiting) == 1
    assert first.waiting[0].reason == "destination pacs: connection lost"
    assert 5.0 <= first.waiting[0].retry_in <= 10.0  # first backoff step, default 10 s

    second = _outbox(deliveries, stand).deliver("job-1", files, [dest])
    assert second.delivered == ["pacs"]
    assert stand.calls == [[f.stem for f in files], [files[1].stem]]  # the SEG went once
    third = _outbox(deliveries, stand).deliver("job-1", files, [dest])
    assert third.delivered == ["pacs"] and len(stand.calls) == 2  # nothing left to send


def test_warnings_count_as_stored_and_are_recorded_failures_are_named(
    deliveries: Deliveries, files: list[Path]
) -> None:
    stand = Stand()
    stand.script = [0xB000, 0xC000]
    report = _outbox(deliveries, stand).deliver("job-2", files, [_destination()])
    assert report.warnings == [
        "pacs stored Segmentation with warning 0xB000 (Coercion of Data Elements)"
    ]
    # The destination answered and refused: no retry can change that.
    assert report.gave_up == [
        "export to pacs: C-STORE of Segmentation refused with 0xC000 (Cannot Understand)"
    ]
    [view] = deliveries.of_job("job-2")
    assert [(o.sop_uid, o.status, o.stored) for o in view.objects] == [
        (files[0].stem, 0xB000, True),
        (files[1].stem, 0xC000, False),
    ]


def test_out_of_resources_is_retried(deliveries: Deliveries, files: list[Path]) -> None:
    stand = Stand()
    stand.script = [0x0000, 0xA700]
    report = _outbox(deliveries, stand).deliver("job-3", files, [_destination()])
    assert report.gave_up == [] and len(report.waiting) == 1
    assert "0xA700 (Refused: Out of Resources)" in report.waiting[0].reason


def test_the_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through(
    deliveries: Deliveries, files: list[Path]
) -> None:
    stand = Stand()
    dest = _destination(breaker_failures=2, retry_backoff_seconds=30)
    for job in ("a", "b"):
        stand.script = ["destination pacs: connection refused at 127.0.0.1:11112"]
        _outbox(deliveries, stand).deliver(job, files, [dest])
    assert len(stand.calls) == 2
    failures, open_until = deliveries.breaker("pacs")
    assert failures == 2 and open_until > datetime.now(UTC)

    # While open, another study's export does not connect at all; it waits for the breaker.
    waiting = _outbox(deliveries, stand).deliver("c", files, [dest])
    assert len(stand.calls) == 2
    assert waiting.waiting[0].reason == "pacs unreachable (2 failures in a row), waiting"
    assert 1.0 <= waiting.waiting[0].retry_in <= 30.0

    # Once the open period is over, exactly one worker claims the probe.
    later = open_until + timedelta(seconds=1)
    assert deliveries.claim_probe("pacs", later, timedelta(seconds=120))
    assert not deliveries.claim_probe("pacs", later, timedelta(seconds=120))

    # A successful probe closes it for everyone.
    after_hold = later + timedelta(seconds=121)
    report = _outbox(deliveries, stand, now=after_hold).deliver("c", files, [dest])
    assert report.delivered == ["pacs"]
    assert deliveries.breaker("pacs")[0] == 0


def test_past_the_ceiling_the_destination_gives_up_with_the_last_error(
    deliveries: Deliveries, files: list[Path]
) -> None:
    stand = Stand()
    stand.script = ["destination pacs: connection refused at 127.0.0.1:11112"]
    dest = _destination(give_up_after_hours=2, breaker_failures=10)
    first = _outbox(deliveries, stand).deliver("job-4", files, [dest])
    assert len(first.waiting) == 1
    later = datetime.now(UTC) + timedelta(hours=2, seconds=1)
    report = _outbox(deliveries, stand, now=later).deliver("job-4", files, [dest])
    assert report.gave_up == [
        "export to pacs: gave up after 2 h (1 attempt): "
        "destination pacs: connection refused at 127.0.0.1:11112"
    ]
    assert len(stand.calls) == 1  # no attempt after the ceiling

    # `pacs-agent retry` starts the ceiling again.
    deliveries.restart("job-4")
    assert _outbox(deliveries, stand).deliver("job-4", files, [dest]).delivered == ["pacs"]


def test_each_destination_goes_its_own_way(deliveries: Deliveries, files: list[Path]) -> None:
    sent_to: list[str] = []

    def send(
        dest: DestinationSettings,
        calling_ae: str,
        paths: Sequence[Path],
        record: Callable[[ObjectStatus], None],
    ) -> None:
        sent_to.append(dest.name)
        if dest.name == "down":
            raise RetryableError("destination down: connection refused at 127.0.0.1:11112")
        for path in paths:
            record(ObjectStatus(path.stem, SegmentationStorage, 0x0000))

    outbox = Outbox(deliveries, "PACS_AGENT", send=send, rng=random.Random(3))
    dests = [_destination("up"), _destination("down")]
    first = outbox.deliver("job-5", files, dests)
    assert first.delivered == ["up"] and [w.destination for w in first.waiting] == ["down"]
    outbox.deliver("job-5", files, dests)
    assert sent_to == ["up", "down", "down"]  # the one that stored everything is left alone


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class StatusPeer:
    """A pynetdicom Storage SCP answering each SOP class with a chosen status and comment."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        ae = AE(ae_title="PACS")
        for sop_class in answers:
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server
        self.port: int = server.server_address[1]

    def _store(self, event: Event) -> Dataset:
        status, comment = self.answers[str(event.request.AffectedSOPClassUID)]
        ds = Dataset()
        ds.Status = status
        if comment:
            ds.ErrorComment = comment
        return ds


def test_statuses_from_a_real_association_are_recorded_per_object(
    deliveries: Deliveries, files: list[Path]
) -> None:
    peer = StatusPeer(
        {
            SegmentationStorage: (0xB007, "coerced"),
            Comprehensive3DSRStorage: (0xA900, "not this class"),
        }
    )
    records: list[logging.LogRecord] = []
    audit_log = logging.getLogger(AUDIT_LOGGER)
    handler = _Collect(records)
    audit_log.addHandler(handler)
    level = audit_log.level
    audit_log.setLevel(logging.INFO)
    try:
        outbox = Outbox(deliveries, "PACS_AGENT")
        report = outbox.deliver("job-6", files, [_destination(port=peer.port)], study="k3y")
    finally:
        audit_log.removeHandler(handler)
        audit_log.setLevel(level)
        peer.server.shutdown()
    [entry] = [r.audit for r in records]  # type: ignore[attr-defined]
    assert entry["event"] == "objects-exported" and entry["study"] == "k3y"
    assert entry["destination"]["name"] == "pacs" and entry["count"] == 2
    assert entry["failed"] == 1 and entry["outcome"] == 4  # minor failure: one of two stored
    assert report.warnings == [
        "pacs stored Segmentation with warning 0xB007 (Data Set Does Not Match SOP Class)"
    ]
    assert report.gave_up == [
        "export to pacs: C-STORE of Comprehensive 3D SR refused with "
        "0xA900 (Data Set Does Not Match SOP Class): not this class"
    ]
    [view] = deliveries.of_job("job-6")
    assert [(o.status, o.stored, o.comment) for o in view.objects] == [
        (0xB007, True, "coerced"),
        (0xA900, False, "not this class"),
    ]
