"""Peers that hold the listener's resources: slow-loris, half PDUs, giant PDUs and datasets.

Each would, unguarded, hold an association slot (and its threads) or memory for as long as
it likes; here each is dropped or refused and the slot is free again for a real sender.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.connections import close_connection
from agent.receive.reads import CappedDataset
from tests.support.hostile import associate_rq, associated_socket, send_and_hang_up
from tests.support.receiver import Receiver, loopback_settings, minimal_ct

NETWORK_TIMEOUT = 1.0
# Long enough that a test passing within it shows the slot was freed by the guard, not by it.
ACSE_TIMEOUT = 60.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    settings = loopback_settings(
        network_timeout_seconds=NETWORK_TIMEOUT,
        acse_timeout_seconds=ACSE_TIMEOUT,
        max_associations=2,
        max_instance_bytes=256 * 1024,
    )
    with Receiver(tmp_path / "spool", settings) as rx:
        yield rx


def _echo_once_free(port: int, within: float = 15.0) -> int:
    """C-ECHO, retrying while the receiver refuses as busy (as a real sender would)."""
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + within
    while True:
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
        try:
            if assoc.is_established:
                status = int(assoc.send_c_echo().Status)
                assoc.release()
                return status
        finally:
            close_connection(assoc)
        assert time.monotonic() < deadline, "no association slot came free"
        time.sleep(0.2)


def _closed_by_peer(sock: socket.socket, within: float = 15.0) -> bool:
    """Whether the receiver closes `sock` within `within` seconds (EOF, reset or abort)."""
    sock.settimeout(within)
    try:
        while data := sock.recv(65536):
            if data[:1] == b"\x07":  # an A-ABORT, then the close
                continue
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_peers_that_hang_up_before_associating_free_their_slots_at_once(
    receiver: Receiver,
) -> None:
    for payload in (b"", b"\x01\x00", b"GET / HTTP/1.0\r\n\r\n", associate_rq()[:40]):
        for _ in range(3):
            send_and_hang_up(receiver.port, payload)
    # Twelve such peers against two slots: pynetdicom alone would hold each for the ACSE
    # timeout (60 s here) waiting for a request that cannot come.
    assert _echo_once_free(receiver.port) == 0x0000


def test_a_silent_half_pdu_and_a_slow_loris_are_dropped(receiver: Receiver) -> None:
    request = associate_rq()
    silent = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
    silent.sendall(request[:20])  # a header declaring the whole request, then nothing
    loris = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
    dropped = threading.Event()

    def trickle() -> None:  # the request one byte at a time, each well within any idle timeout
        try:
            for byte in request:
                loris.sendall(bytes([byte]))
                time.sleep(0.25)
        except OSError:
            dropped.set()

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        # Both slots are taken; each PDU must arrive whole within the network timeout.
        assert _closed_by_peer(silent)
        sender.join(timeout=15)
        assert dropped.is_set(), "the slow-loris peer was never dropped"
        assert _echo_once_free(receiver.port) == 0x0000
    finally:
        silent.close()
        loris.close()


def test_a_pdu_declared_larger_than_we_accept_is_not_read(receiver: Receiver) -> None:
    with associated_socket(receiver.port) as sock:
        # P-DATA-TF of 2 GiB: the header alone must end the association, whatever follows.
        sock.sendall(struct.pack(">BBI", 0x04, 0, 0x7FFFFFFF))
        sock.settimeout(15)
        with pytest.raises(OSError):  # reset or broken pipe once the receiver has hung up
            for _ in range(64):
                sock.sendall(bytes(1024 * 1024))
    assert _echo_once_free(receiver.port) == 0x0000


def _instance_of(size: int) -> Dataset:
    ds = minimal_ct()
    ds.add_new(0x00091010, "OB", bytes(size))  # bulk in a private element
    return ds


def test_a_dataset_over_the_size_limit_is_refused_and_the_association_goes_on(
    receiver: Receiver,
) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
    try:
        assert assoc.is_established
        big, small = _instance_of(4 * 1024 * 1024), _instance_of(1024)
        assert int(assoc.send_c_store(big).Status) == 0xA700
        # The rest of the big message was read and dropped: the next one is understood.
        assert int(assoc.send_c_store(small).Status) == 0x0000
        assoc.release()
    finally:
        close_connection(assoc)
    assert [a.sop_uid for a in receiver.arrivals] == [small.SOPInstanceUID]
    assert list(receiver.layout.tmp.iterdir()) == []  # the refused one's temp file is gone


def test_the_dataset_buffer_keeps_nothing_past_its_limit_but_counts_it() -> None:
    buffer = CappedDataset(limit=10)
    buffer.write(b"12345")
    assert buffer.getvalue() == b"12345" and not buffer.overflowed
    buffer.write(memoryview(b"678901"))
    buffer.write(b"x" * 1000)
    assert buffer.overflowed
    assert buffer.received == 1011
    assert buffer.getvalue() == b""
