"""Hostile input on the DICOM port: a thousand and more malformed PDUs from concurrent peers.

Every case is generated from a seeded random source, so a failure reproduces. The receiver
runs in this process, so an exception in one of pynetdicom's threads fails the test (pytest
reports unhandled thread exceptions, and warnings are errors).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.support.dcmtk import storescu
from tests.support.phantom import write_phantom_series
from tests.support.receiver import Receiver, loopback_settings

SEED = 20261123
RAW_CASES = 500
ASSOCIATE_CASES = 1000
IDLE_TIMEOUT = 2.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    settings = loopback_settings(
        network_timeout_seconds=IDLE_TIMEOUT, acse_timeout_seconds=IDLE_TIMEOUT, max_associations=8
    )
    with Receiver(tmp_path / "spool", settings) as rx:
        yield rx


def _echo(port: int) -> int:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established, "the listener no longer accepts associations"
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def _send(port: int, payload: bytes, *, linger: float = 0.0) -> None:
    """Connect, send `payload`, maybe wait for the reply, and hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(payload)
            if linger:
                sock.settimeout(linger)
                sock.recv(65536)
        except OSError:
            pass  # the receiver may drop us first: that is the point


def _associate_rq(called: bytes = b"PACS_AGENT", calling: bytes = b"FUZZER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing CT Image Storage, Explicit VR LE."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    application = item(0x10, b"1.2.840.10008.3.1.1.1")
    abstract = item(0x30, str(CTImageStorage).encode())
    transfer = item(0x40, str(ExplicitVRLittleEndian).encode())
    context = item(0x20, bytes([1, 0, 0, 0]) + abstract + transfer)
    max_length = item(0x51, struct.pack(">I", 16384))
    user = item(0x50, max_length + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + application
        + context
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One of the usual fuzzing mutations: flip, truncate, lie about a length, splice, extend."""
    buf = bytearray(data)
    choice = rng.randrange(6)
    if choice == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif choice == 1:  # truncate
        del buf[rng.randrange(1, len(buf)) :]
    elif choice == 2:  # the PDU length lies, up to 4 GiB
        buf[2:6] = struct.pack(">I", rng.choice([0, 1, len(buf) * 4, 0x7FFFFFFF, 0xFFFFFFFF]))
    elif choice == 3:  # an item length lies
        at = rng.randrange(6, len(buf) - 2)
        buf[at : at + 2] = struct.pack(">H", rng.randrange(65536))
    elif choice == 4:  # splice random bytes in
        at = rng.randrange(len(buf))
        buf[at:at] = rng.randbytes(rng.randint(1, 64))
    else:  # trailing garbage after a valid PDU
        buf += rng.randbytes(rng.randint(1, 256))
    return bytes(buf)


def _threads_settle(baseline: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and threading.active_count() > baseline:
        time.sleep(0.1)
    return threading.active_count()


def test_malformed_pdus_from_concurrent_peers_leave_the_listener_serving(
    receiver: Receiver, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    threads_before = threading.active_count()
    template = _associate_rq()
    cases: list[tuple[bytes, float]] = []
    for _ in range(RAW_CASES):  # random bytes, any length, maybe a valid PDU type byte first
        head = bytes([rng.randrange(1, 8)]) if rng.random() < 0.5 else b""
        cases.append((head + rng.randbytes(rng.randint(0, 2048)), 0.0))
    for index in range(ASSOCIATE_CASES):  # mutated association requests, half waiting for a reply
        cases.append((_mutate(template, rng), 0.05 if index % 2 else 0.0))
    rng.shuffle(cases)

    # Eight hostile peers at a time, as a scanner would connect.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda case: _send(receiver.port, case[0], linger=case[1]), cases))
    # A peer that left half a PDU behind holds a slot until the ACSE timeout; then all is free.
    _threads_settle(threads_before, IDLE_TIMEOUT * 3 + 10)
    assert _echo(receiver.port) == 0x0000
    # Every association thread of a dropped peer ended, and so do the echo's own.
    assert _threads_settle(threads_before, IDLE_TIMEOUT * 3 + 10) <= threads_before + 1
    assert receiver.arrivals == []

    # And a normal study still goes through, with a real sender.
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    storescu(truth.files, port=receiver.port, called_aet="PACS_AGENT")
    assert {a.sop_uid for a in receiver.arrivals} == set(truth.sop_uids)
