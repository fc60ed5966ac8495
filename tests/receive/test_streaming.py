"""C-STORE datasets are streamed to disk as they arrive: memory does not grow with their size."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.receive.filemeta import encode_file_meta
from agent.spool.layout import SpoolLayout
from tests.support.hostile import associated_socket
from tests.support.receiver import Receiver, loopback_settings, minimal_ct

MIB = 1024 * 1024
SIZE = 200 * MIB  # of each instance's pixel data


@pytest.fixture(autouse=True)
def _send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    # Else pynetdicom reads the whole file into memory before it sends it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _large_file(path: Path, ds: Dataset, size: int) -> Path:
    """A Part 10 file of `ds` with `size` bytes of pixel data, written without holding them."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    meta = encode_file_meta(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, "SENDER"
    )
    element = (0x7FE0).to_bytes(2, "little") + (0x0010).to_bytes(2, "little") + b"OB\0\0"
    with path.open("wb") as fp:
        fp.write(meta + head.getvalue() + element + size.to_bytes(4, "little"))
        chunk = bytes(MIB)
        for _ in range(size // MIB):
            fp.write(chunk)
    return path


def _send(port: int, path: Path, answers: list[int]) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established
    answers.append(int(assoc.send_c_store(path).Status))
    assoc.release()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        yield rx


def test_two_large_instances_at_once_do_not_grow_memory_by_their_size(tmp_path: Path) -> None:
    datasets = [minimal_ct(), minimal_ct()]
    files = [_large_file(tmp_path / f"{i}.dcm", ds, SIZE) for i, ds in enumerate(datasets)]
    spool = SpoolLayout(tmp_path / "spool")
    # The receiver in a process of its own: pynetdicom's sender holds what it sends.
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.receiver_child", str(spool.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        port, started = (int(word) for word in child.stdout.readline().split())
        answers: list[int] = []
        senders = [threading.Thread(target=_send, args=(port, f, answers)) for f in files]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        child.stdin.write("\n")
        child.stdin.flush()
        peak = int(child.stdout.readline())
        child.stdin.close()
        child.wait(30)
    assert answers == [0, 0]
    spooled = {p.stem: p for p in spool.studies.glob("*/*/*.dcm")}
    for ds, sent in zip(datasets, files, strict=True):
        assert spooled[ds.SOPInstanceUID].stat().st_size == sent.stat().st_size
    assert list(spool.tmp.iterdir()) == []
    # A bound on memory, not a time: a few PDUs per association, not the 400 MB received.
    assert (peak - started) * 1024 < 64 * MIB, f"peak RSS grew by {(peak - started) >> 10} MiB"


def _c_store_pdus(ds: Dataset, size: int) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE request of `ds` with `size` bytes of pixel data."""
    ds.add_new(0x7FE00010, "OB", bytes(size))
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def test_a_transfer_cut_off_leaves_no_temp_file(receiver: Receiver) -> None:
    pdus = _c_store_pdus(minimal_ct(), 4 * MIB)
    with associated_socket(receiver.port) as sock:
        sock.sendall(b"".join(pdus[: len(pdus) // 2]))  # the command and half the dataset
        deadline = time.monotonic() + 60
        while not list(receiver.layout.tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(receiver.layout.tmp.iterdir()), "no temp file while the dataset arrived"
    # The sender hung up: the association ends, and its half dataset is removed.
    while list(receiver.layout.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(receiver.layout.tmp.iterdir()) == []
    assert receiver.spooled() == [] and receiver.arrivals == []
