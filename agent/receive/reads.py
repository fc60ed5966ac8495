"""Bounded reads on an accepted connection: no PDU may be too large or arrive too slowly,
and no dataset is held in memory beyond the instance size limit.

pynetdicom reads a PDU by its declared length with a blocking socket and no deadline. A peer
that sends the start of a PDU and then nothing (or one byte a minute: a slow-loris) holds its
association slot, and the thread behind it, for as long as it keeps the connection open,
because the ACSE and network timeouts are checked only between PDUs. A peer that declares a
PDU of gigabytes and sends it is buffered whole. Here every read of a PDU must end within the
network timeout and may not exceed the largest PDU we accept; otherwise the read fails as a
broken connection would (PS3.8 Evt17), which ends the association and frees its slot.
"""

from __future__ import annotations

import contextlib
import socket
import time
from io import BytesIO

from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA
from typing_extensions import Buffer

# Room above the maximum PDU length we advertise, for a peer that counts the PDV item
# headers differently; an A-ASSOCIATE-RQ is a few kilobytes.
PDU_SLACK_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


class PeerReadError(OSError):
    """A peer's PDU is too large or too slow; the association ends as if it had hung up."""


def bound_reads(assoc: Association, *, max_pdu_bytes: int, deadline_seconds: float) -> None:
    """Make each read of this association's socket bounded in size and in time."""
    sock = assoc.dul.socket
    if sock is None:
        return
    limit = max_pdu_bytes + PDU_SLACK_BYTES

    def recv(nr_bytes: int) -> bytearray:
        raw = sock.socket
        if raw is None:
            raise PeerReadError("the connection is closed")
        if nr_bytes > limit:
            raise PeerReadError(f"declared PDU of {nr_bytes} bytes exceeds the {limit} allowed")
        return read_within(raw, nr_bytes, deadline_seconds)

    # Per instance: pynetdicom's DUL calls socket.recv(n) for the header and for the body.
    setattr(sock, "recv", recv)  # noqa: B010


def read_within(raw: socket.socket, nr_bytes: int, deadline_seconds: float) -> bytearray:
    """Read `nr_bytes` (fewer if the peer hangs up) within `deadline_seconds` in all."""
    data = bytearray()
    previous = raw.gettimeout()
    deadline = time.monotonic() + deadline_seconds
    try:
        while len(data) < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerReadError(
                    f"PDU incomplete after {deadline_seconds:g} s ({len(data)} of {nr_bytes} bytes)"
                )
            raw.settimeout(remaining)
            try:
                chunk = raw.recv(min(CHUNK_BYTES, nr_bytes - len(data)))
            except TimeoutError:
                continue  # the loop names the deadline
            if not chunk:
                break  # the peer hung up: pynetdicom sees a short PDU, as before
            data += chunk
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile by another thread
            raw.settimeout(previous)
    return data


class CappedDataset(BytesIO):
    """A C-STORE dataset buffer that stops keeping bytes past `limit`, but goes on counting.

    The sender is still read to the end of its message (DIMSE has no way to refuse half way),
    so it gets the handler's 0xA700 answer instead of a torn connection; the process holds at
    most `limit` bytes of it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    @property
    def overflowed(self) -> bool:
        return self.received > self.limit

    def write(self, data: Buffer, /) -> int:
        size = memoryview(data).nbytes
        self.received += size
        if self.received > self.limit:
            if self.tell():
                self.seek(0)
                self.truncate()
            return size
        return super().write(data)


def bound_datasets(assoc: Association, *, max_bytes: int) -> None:
    """Give each incoming DIMSE message of this association a CappedDataset."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive: P_DATA) -> None:
        if dimse.message is None:
            dimse.message = DIMSEMessage()
            dimse.message.data_set = CappedDataset(max_bytes)
        receive(primitive)

    setattr(dimse, "receive_primitive", receive_primitive)  # noqa: B010
