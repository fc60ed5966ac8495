"""C-STORE datasets written to the spool's tmp folder as their fragments arrive, never held whole.

pynetdicom assembles each incoming DIMSE message's dataset in a BytesIO: two concurrent
instances of 600 MB held 1.2 GB, and 32 associations at the 2 GiB limit could hold 64 GiB.
Here each message's dataset goes to a temp file in the spool's tmp folder, behind the File
Meta Information the spool file needs, so that the C-STORE handler, once it has checked the
dataset, syncs that file and renames it into place: one write of the bytes, memory per
association bounded by one PDU. Past the size limit nothing more is written (the sender is
still read to the end of its message, to get the handler's 0xA700 answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from typing_extensions import Buffer

from agent.receive.filemeta import encode_file_meta

log = logging.getLogger(__name__)


class StreamedDataset(BytesIO):
    """One C-STORE dataset, streamed to `path` in `tmp` behind its file meta group.

    A BytesIO only in type, for pynetdicom, which writes each fragment to it; it keeps nothing
    in memory. It counts what it is given (`received`), writes it while within `limit`, and
    hashes it: `digest` is the SHA-256 of the dataset as received, without the meta group
    (whose Source AE Title names the sender, not the content).
    """

    def __init__(self, tmp: Path, limit: int, assoc: Association, message: DIMSEMessage) -> None:
        super().__init__()
        self.tmp = tmp
        self.limit = limit
        self.received = 0
        self.path: Path | None = None
        self.dataset_offset = 0
        self.error: OSError | None = None
        self.claimed = False
        self._assoc = assoc
        self._message = message
        self._fd: int | None = None
        self._hash = hashlib.sha256()
        self._discarded = False

    @property
    def overflowed(self) -> bool:
        return self.received > self.limit

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: Buffer, /) -> int:
        view = memoryview(data)
        size = view.nbytes
        self.received += size
        if self._discarded or self.error is not None:
            return size
        if self.overflowed:
            self.discard()  # the handler refuses it: nothing more is kept
            return size
        self._hash.update(view)
        try:
            if self._fd is None:
                self._open()
            while view:
                view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        except OSError as exc:
            log.error("spool write failed: %s", exc.strerror)
            self.error = exc
            self.discard()
        return size

    def _open(self) -> None:
        """Create the temp file and write the meta group, from the request's command set.

        The handler stores the file only if the dataset names the same SOP Class and Instance
        as the request (PS3.4 B.2.3), so the group made from the request is the dataset's.
        """
        command = self._message.command_set
        context = self._assoc._accepted_cx.get(self._message.context_id or 0)
        syntax = context.transfer_syntax[0] if context and context.transfer_syntax else ""
        header = encode_file_meta(
            _ascii(command.get("AffectedSOPClassUID", "")),
            _ascii(command.get("AffectedSOPInstanceUID", "")),
            _ascii(syntax),
            _ascii(self._assoc.requestor.ae_title),
        )
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.path = path
        view = memoryview(header)
        while view:
            view = view[os.write(self._fd, view) :]
        self.dataset_offset = len(header)

    @contextlib.contextmanager
    def dataset(self) -> Iterator[BinaryIO]:
        """The dataset read back from the temp file, from its first byte (empty if none)."""
        if self.path is None:
            yield BytesIO()
            return
        with self.path.open("rb") as fp:
            fp.seek(self.dataset_offset)
            yield fp

    def sync(self) -> Path:
        """Make the temp file durable (fdatasync) and close it; its path, to be renamed."""
        if self._fd is None or self.path is None:
            raise OSError("no dataset file to sync")
        fd, self._fd = self._fd, None
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return self.path

    def discard(self) -> None:
        """Close and remove the temp file (already renamed into the spool: nothing to do)."""
        self._discarded = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _ascii(value: object) -> str:
    # A request's UIDs are not validated yet: a hostile one must not stop the write here (the
    # handler refuses it by the dataset's own UIDs).
    return str(value).encode("ascii", "replace").decode("ascii")


class DatasetStreams:
    """Streams each association's incoming datasets to `tmp`; what is left at its end is removed.

    `opened` is an EVT_CONN_OPEN handler, `closed` one for EVT_CONN_CLOSE and EVT_ABORTED:
    a transfer cut off half way, or a dataset no handler took, leaves no temp file behind.
    """

    def __init__(self, tmp: Path, limit: int) -> None:
        self._tmp = tmp
        self._limit = limit
        self._lock = threading.Lock()
        self._open: dict[int, list[StreamedDataset]] = {}

    def opened(self, event: Event) -> None:
        assoc = event.assoc
        dimse = assoc.dimse
        receive = dimse.receive_primitive
        key = id(assoc)
        with self._lock:
            self._open[key] = []

        def receive_primitive(primitive: P_DATA) -> None:
            if dimse.message is None:
                message = DIMSEMessage()
                stream = StreamedDataset(self._tmp, self._limit, assoc, message)
                message.data_set = stream
                dimse.message = message
                with self._lock:
                    streams = self._open.setdefault(key, [])
                    streams[:] = [s for s in streams if not s.claimed]
                    streams.append(stream)
            receive(primitive)

        setattr(dimse, "receive_primitive", receive_primitive)  # noqa: B010

    def closed(self, event: Event) -> None:
        with self._lock:
            streams = self._open.pop(id(event.assoc), [])
        for stream in streams:
            if not stream.claimed:
                stream.discard()
