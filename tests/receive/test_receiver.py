"""The receiver over real associations on 127.0.0.1: echo, store, bad input, access control."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, Association, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.db.values import CleanSend, Interruption
from agent.settings import AllowedCaller
from agent.spool.digest import dataset_digest
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import storescu
from tests.support.foreign import FOREIGN_WRITERS, PRIVATE_SOP_CLASS
from tests.support.receiver import Receiver, loopback_settings, minimal_ct


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        yield rx


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group (PS3.10 7.1)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    # Preamble (128) + "DICM" (4) + the group length element (12) + the rest of group 2.
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[start:]


def _associate(port: int, calling: str = "TESTSCU", ts: str = ExplicitVRLittleEndian) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ts)
    return ae


def test_echo(receiver: Receiver) -> None:
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_store_uncompressed_with_pynetdicom(receiver: Receiver) -> None:
    files = dicom_files(shared_data("dcmqi", "ct-3slice"))
    ae = AE(ae_title="TESTSCU")
    ts = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files
    }
    ae.add_requested_context(CTImageStorage, sorted(ts))
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    datasets = [pydicom.dcmread(f) for f in files]
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses == [0] * len(files)
    spooled = receiver.spooled()
    assert len(spooled) == len(files) == len(receiver.arrivals)
    by_sop = {p.stem: p for p in spooled}
    for ds in datasets:
        # What pynetdicom put on the wire, byte for byte, is what the spool holds.
        syntax = ds.file_meta.TransferSyntaxUID
        sent = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
        assert _dataset_bytes(by_sop[str(ds.SOPInstanceUID)]) == sent


def test_store_jpeg2000_with_storescu_keeps_bytes(receiver: Receiver) -> None:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    storescu(files, port=receiver.port, called_aet="PACS_AGENT")
    spooled = {p.stem: p for p in receiver.spooled()}
    assert len(spooled) == len(files)
    for original in files:
        ds = pydicom.dcmread(original, stop_before_pixels=True)
        stored = spooled[str(ds.SOPInstanceUID)]
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == JPEG2000Lossless
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert _dataset_bytes(stored) == _dataset_bytes(original)
    # Grouped by study and series: one study folder, one series folder.
    assert len({p.parent for p in spooled.values()}) == 1
    assert {a.study_uid for a in receiver.arrivals} == {str(ds.StudyInstanceUID)}


def _ct(**overrides: object) -> Dataset:
    ds = minimal_ct()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid UIDs are the point of the test
        for key, value in overrides.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("overrides", "status", "comment"),
    [
        ({"StudyInstanceUID": None}, 0xC001, "StudyInstanceUID"),
        ({"SeriesInstanceUID": None}, 0xC001, "SeriesInstanceUID"),
        ({"SeriesInstanceUID": "../../etc/passwd"}, 0xC001, "SeriesInstanceUID"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, 0xA900, "SOPClassUID"),
    ],
)
def test_bad_dataset_gets_failure_status_and_is_not_kept(
    receiver: Receiver,
    overrides: dict[str, object],
    status: int,
    comment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = _ct(**overrides)
    ae = _associate(receiver.port)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    # A raw C-STORE request for CT, whatever the dataset holds (pynetdicom's SCU would refuse).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    rsp = _send_with_class(assoc, ds, CTImageStorage, tmp_path)
    monkeypatch.undo()
    assoc.release()
    assert rsp.Status == status
    assert comment in str(rsp.ErrorComment)
    assert receiver.spooled() == []
    assert receiver.arrivals == []
    # The listener survives: a good instance is still accepted afterwards.
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(_ct()).Status == 0
    assoc.release()


def _send_with_class(assoc: Association, ds: Dataset, request_class: str, folder: Path) -> Dataset:
    """Send a C-STORE whose request names `request_class` whatever the dataset holds.

    In chunked mode pynetdicom sends a file's encoded dataset as it is, taking the request's
    SOP Class and Instance from the file meta, which is how a faulty sender's request looks.
    """
    ds.file_meta.MediaStorageSOPClassUID = request_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    path = folder / "bad.dcm"
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)
    rsp: Dataset = assoc.send_c_store(path)
    return rsp


def test_write_failure_returns_out_of_resources(receiver: Receiver) -> None:
    # The temp folder vanishing makes every write fail, as a full or read-only disk would.
    receiver.layout.tmp.rmdir()
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    rsp = assoc.send_c_store(_ct())
    assoc.release()
    assert rsp.Status == 0xA700
    assert receiver.arrivals == []


@pytest.fixture
def restricted(tmp_path: Path) -> Iterator[Receiver]:
    callers = (
        AllowedCaller(ae_title="MODALITY"),
        AllowedCaller(ae_title="FROMHOST", host="127.0.0.2"),
    )
    with Receiver(tmp_path / "spool", loopback_settings(allowed_callers=callers)) as rx:
        yield rx


def test_calling_ae_not_on_list_is_rejected(restricted: Receiver) -> None:
    ae = _associate(restricted.port, calling="STRANGER")
    assoc = ae.associate("127.0.0.1", restricted.port, ae_title="PACS_AGENT")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)

    ok = _associate(restricted.port, calling="MODALITY")
    assoc = ok.associate("127.0.0.1", restricted.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    assoc.release()


def test_calling_ae_from_wrong_host_is_rejected(restricted: Receiver) -> None:
    ae = _associate(restricted.port, calling="FROMHOST")
    assoc = ae.associate("127.0.0.1", restricted.port, ae_title="PACS_AGENT")
    assert assoc.is_rejected
    # DCMTK storescu with an unknown calling AE title is refused as well, and nothing is kept.
    files = dicom_files(shared_data("dcmqi", "ct-3slice"))[:1]
    result = storescu(
        files,
        port=restricted.port,
        called_aet="PACS_AGENT",
        calling_aet="STRANGER",
        check=False,
    )
    assert result.returncode != 0
    assert restricted.spooled() == []


def test_concurrent_senders_all_land(receiver: Receiver, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.phantom import write_phantom_series

    series = [
        list(write_phantom_series(tmp_path / f"s{i}", slices=20, rows=64, cols=64, seed=i).files)
        for i in range(3)
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda files: storescu(files, port=receiver.port, called_aet="PACS_AGENT"), series
            )
        )
    assert all(r.returncode == 0 for r in results)
    assert len(receiver.spooled()) == 60
    assert len({a.study_uid for a in receiver.arrivals}) == 3


def test_misbehaving_peers_do_not_take_the_listener_down(receiver: Receiver) -> None:
    import socket

    # Garbage instead of an A-ASSOCIATE-RQ, then a connection dropped mid-PDU.
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"\x01\x00\x00\x00\x10\x00\x00\x01"):
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
            sock.sendall(payload)
    # A sender that aborts right after associating.
    ae = _associate(receiver.port)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    assoc.abort()
    assert receiver.spooled() == []
    # The listener still answers.
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(_ct()).Status == 0
    assoc.release()
    assert len(receiver.spooled()) == 1


def test_foreign_and_private_objects_are_stored(receiver: Receiver, tmp_path: Path) -> None:
    """SR, PDF, presentation state, KOS, RT and a vendor's private SOP class all land."""
    study_uid = str(generate_uid())
    files = [write(tmp_path / "foreign", study_uid) for write in FOREIGN_WRITERS]
    ae = AE(ae_title="TESTSCU")
    for path in files:
        ae.add_requested_context(pydicom.dcmread(path).SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(files)
    assert len(receiver.spooled()) == len(files)
    assert PRIVATE_SOP_CLASS in {a.sop_class_uid for a in receiver.arrivals}


def test_unlisted_private_sop_class_is_refused_at_association(tmp_path: Path) -> None:
    settings = loopback_settings(private_sop_classes=())
    with Receiver(tmp_path / "spool", settings) as receiver:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.3.12.2.1107.5.9.1", ExplicitVRLittleEndian)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
        # Accepted as an association (nothing to reject it for) but with no usable context.
        if assoc.is_established:
            assert not assoc.accepted_contexts
            assoc.release()


def test_syntax_without_decoder_is_still_stored(receiver: Receiver, tmp_path: Path) -> None:
    """JPEG XL has no decoder here; the instance is kept (the study is skipped by name later)."""
    jpeg_xl = "1.2.840.10008.1.2.4.110"
    ds = _ct()
    ds.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 30])
    ds["PixelData"].VR = "OB"
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, jpeg_xl)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    ds.file_meta.TransferSyntaxUID = jpeg_xl
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    (path,) = receiver.spooled()
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == jpeg_xl


def _news_for(receiver: Receiver, count: int) -> list[object]:
    """The association news the receiver gave, once `count` of them have come (the outcome is
    reported when the association's own thread ends, just after the peer sees it end)."""
    deadline = time.monotonic() + 10
    while len(receiver.news) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(receiver.news)


def test_the_assembler_hears_how_each_association_ended_for_each_study(
    receiver: Receiver,
) -> None:
    first, second = minimal_ct(), minimal_ct()
    second.StudyInstanceUID = first.StudyInstanceUID
    ae = _associate(receiver.port)

    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(first).Status == 0x0000
    assoc.release()
    (clean,) = _news_for(receiver, 1)
    assert isinstance(clean, CleanSend) and clean.study_uid == first.StudyInstanceUID

    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(second).Status == 0x0000
    assoc.abort()
    _, cut = _news_for(receiver, 2)
    assert cut == Interruption(
        first.StudyInstanceUID, cut.at, "association aborted after 1 instances"
    )  # type: ignore[union-attr]
    assert cut.at > clean.began  # type: ignore[union-attr]


def test_instances_refused_for_resources_interrupt_the_study_and_others_do_not(
    receiver: Receiver,
) -> None:
    stored, refused = minimal_ct(), minimal_ct()
    refused.StudyInstanceUID = stored.StudyInstanceUID
    unreadable = minimal_ct()
    unreadable.StudyInstanceUID = stored.StudyInstanceUID
    del unreadable.SeriesInstanceUID  # refused as it is: no re-send would change that
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(stored).Status == 0x0000
    assert assoc.send_c_store(unreadable).Status == 0xC001
    assoc.release()
    (clean,) = _news_for(receiver, 1)
    assert isinstance(clean, CleanSend)

    # The disk fills mid-association: every write fails from now on, 0xA700. The refused
    # instance's study is not read (its bytes never reached the spool), so the refusal counts
    # against every study the association delivered.
    more = minimal_ct()
    more.StudyInstanceUID = stored.StudyInstanceUID
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(more).Status == 0x0000
    receiver.layout.tmp.rmdir()
    assert assoc.send_c_store(refused).Status == 0xA700
    assoc.release()
    _, cut = _news_for(receiver, 2)
    assert isinstance(cut, Interruption)
    assert cut.what == "1 instances refused for resources"


def test_an_instance_in_another_series_of_its_study_is_a_named_duplicate(
    receiver: Receiver,
) -> None:
    """One SOP Instance UID names one object (PS3.5 9): the same UID in a second series of
    the study is refused as 0x0111 (PS3.7 C.4.2), not stored beside the first; the same UID
    in the same series is a re-send, stored again, with the digest of its new content."""
    first = minimal_ct()
    moved = minimal_ct()
    moved.StudyInstanceUID = first.StudyInstanceUID
    moved.SOPInstanceUID = first.SOPInstanceUID
    changed = minimal_ct()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(changed, keyword, getattr(first, keyword))
    changed.ImageComments = "changed content"
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.send_c_store(first).Status == 0x0000
    rsp = assoc.send_c_store(moved)
    assert assoc.send_c_store(changed).Status == 0x0000
    assoc.release()
    assert rsp.Status == 0x0111
    assert str(rsp.ErrorComment) == "SOP Instance already stored in another series of this study"
    assert [p.parent for p in receiver.spooled()] == [receiver.arrivals[0].path.parent]
    assert [a.series_uid for a in receiver.arrivals] == [first.SeriesInstanceUID] * 2
    original, resent = (a.digest for a in receiver.arrivals)
    assert len(original) == 64 and resent != original
    assert resent == dataset_digest(receiver.spooled()[0])
    # A refused duplicate is not one the sender will send again: the study is not waiting.
    (news,) = _news_for(receiver, 1)
    assert isinstance(news, CleanSend)


def test_each_arrival_carries_the_digest_of_its_accession_number(receiver: Receiver) -> None:
    from agent.logs import accession_digest

    numbered, unnumbered = minimal_ct(), minimal_ct()
    numbered.AccessionNumber = "RAD-2026-0042"
    assoc = _associate(receiver.port).associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in (numbered, unnumbered)]
    assoc.release()
    assert statuses == [0, 0]
    by_sop = {a.sop_uid: a.accession_hash for a in receiver.arrivals}
    assert by_sop == {
        str(numbered.SOPInstanceUID): accession_digest("RAD-2026-0042"),
        str(unnumbered.SOPInstanceUID): "",
    }
