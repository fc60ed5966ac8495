"""Hostile input for the DICOM port: raw PDUs, mutations of real ones, and mutated datasets.

Everything is drawn from a seeded random source, so a failure reproduces.
"""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

# PS3.5 7.1.2: explicit VRs whose length is 32 bits (after two reserved bytes).
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
LYING_LENGTHS = (0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


def send_and_hang_up(port: int, payload: bytes, *, linger: float = 0.0) -> None:
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


def associate_rq(called: bytes = b"PACS_AGENT", calling: bytes = b"FUZZER") -> bytes:
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


def associated_socket(port: int) -> socket.socket:
    """A raw connection on which the receiver has accepted `associate_rq()`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq())
    header = sock.recv(6)
    assert header[:1] == b"\x02", f"association not accepted: {header!r}"
    (length,) = struct.unpack(">I", header[2:6])
    while length:
        length -= len(sock.recv(length))
    return sock


def mutate_pdu(data: bytes, rng: random.Random) -> bytes:
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


class DatasetMutator:
    """Mutations of one real DICOM file's dataset; the file meta stays, so it can be sent."""

    def __init__(self, path: Path) -> None:
        self.raw = path.read_bytes()
        ds = dcmread(path)
        # 128-byte preamble, "DICM", (0002,0000) UL in 12 bytes, then the rest of the meta.
        self.body_start = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        self.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        implicit = ds.file_meta.TransferSyntaxUID.is_implicit_VR
        # (offset, size) of each top-level element's length field.
        self.lengths: list[tuple[int, int]] = []
        for elem in ds._dict.values():
            if not isinstance(elem, RawDataElement):
                continue
            if implicit or str(elem.VR) in LONG_VRS:
                self.lengths.append((elem.value_tell - 4, 4))
            else:
                self.lengths.append((elem.value_tell - 2, 2))

    def mutate(self, rng: random.Random) -> bytes:
        buf = bytearray(self.raw)
        choice = rng.randrange(5)
        if choice in (0, 1):  # an element's length lies (twice as likely: the case that matters)
            at, size = rng.choice(self.lengths)
            lie = rng.choice(LYING_LENGTHS) & (0xFFFF if size == 2 else 0xFFFFFFFF)
            buf[at : at + size] = lie.to_bytes(size, "little")
        elif choice == 2:  # flip bytes anywhere in the dataset
            for _ in range(rng.randint(1, 16)):
                buf[rng.randrange(self.body_start, len(buf))] = rng.randrange(256)
        elif choice == 3:  # truncate the dataset
            del buf[rng.randrange(self.body_start, len(buf)) :]
        else:  # splice random bytes in
            at = rng.randrange(self.body_start, len(buf))
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        return bytes(buf)
