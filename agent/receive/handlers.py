"""C-STORE, C-ECHO and association handlers: each returns a DICOM status and never raises."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from agent.db import ArrivedInstance
from agent.logs import log_context, study_key
from agent.receive.filemeta import encode_file_meta
from agent.receive.identify import Unreadable, identify
from agent.settings import AllowedCaller
from agent.spool.layout import SpoolLayout, is_valid_uid
from agent.spool.writer import write_atomic

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1 (Storage Service Class C-STORE statuses).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_UIDS = 0xC001
UNEXPECTED = 0xC0FF

ArrivalSink = Callable[[ArrivedInstance], None]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # ErrorComment is LO: 64 characters at most (PS3.7 C.4.2.1.1 and Annex C).
    ds.ErrorComment = comment[:64]
    return ds


class StoreHandler:
    """Writes each received instance to the spool, then acknowledges it."""

    def __init__(self, layout: SpoolLayout, sink: ArrivalSink) -> None:
        self._layout = layout
        self._sink = sink

    def __call__(self, event: Event) -> int | Dataset:
        try:
            return self._store(event)
        except Exception:  # the boundary: the listener must survive anything
            log.exception("unexpected error storing an instance")
            return _status(UNEXPECTED, "internal error, instance not stored")

    def _store(self, event: Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        raw_stream = request.DataSet
        if not isinstance(raw_stream, BytesIO):
            return _status(CANNOT_UNDERSTAND, "no dataset in request")
        raw = raw_stream.getvalue()
        try:
            ids = identify(raw, event.context.transfer_syntax)
        except Unreadable as exc:
            log.warning("rejected an instance: %s", exc)
            return _status(CANNOT_UNDERSTAND, str(exc))
        missing = [
            name
            for name, value in (
                ("SOPInstanceUID", ids.sop_uid),
                ("StudyInstanceUID", ids.study_uid),
                ("SeriesInstanceUID", ids.series_uid),
            )
            if not is_valid_uid(value)
        ]
        if missing:
            log.warning("rejected an instance: missing or invalid %s", ", ".join(missing))
            return _status(MISSING_UIDS, "missing or invalid " + ", ".join(missing))
        # PS3.4 B.2.3: the dataset must be of the SOP Class and Instance the request names.
        if ids.sop_class_uid != request.AffectedSOPClassUID:
            log.warning("rejected an instance: SOP Class differs from the request's")
            return _status(DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from request")
        if ids.sop_uid != request.AffectedSOPInstanceUID:
            log.warning("rejected an instance: SOP Instance UID differs from the request's")
            return _status(DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from request")

        path = self._layout.instance_path(ids.study_uid, ids.series_uid, ids.sop_uid)
        header = encode_file_meta(
            ids.sop_class_uid,
            ids.sop_uid,
            str(event.context.transfer_syntax),
            str(event.assoc.requestor.ae_title),
        )
        with log_context(study=study_key(ids.study_uid)):
            try:
                write_atomic(path, (header, raw), self._layout.tmp)
            except OSError as exc:
                log.error("spool write failed: %s", exc.strerror)
                return _status(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")
            self._sink(
                ArrivedInstance(
                    study_uid=ids.study_uid,
                    series_uid=ids.series_uid,
                    sop_uid=ids.sop_uid,
                    sop_class_uid=ids.sop_class_uid,
                    path=path,
                    received_at=datetime.now(UTC),
                )
            )
        return SUCCESS


def handle_echo(_event: Event) -> int:
    return SUCCESS


class AccessControl:
    """Accepts only the configured calling AE titles (and hosts); PS3.8 7.1.1.10 reason 3."""

    def __init__(self, allowed: tuple[AllowedCaller, ...]) -> None:
        self._allowed = allowed

    def permits(self, ae_title: str, host: str) -> bool:
        if not self._allowed:
            return True
        return any(
            caller.ae_title.strip() == ae_title.strip() and caller.host in (None, host)
            for caller in self._allowed
        )

    def __call__(self, event: Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive else "")
        host = str(assoc.requestor.address)
        if not self.permits(calling, host):
            log.warning("association rejected: calling AE title not recognized (%s)", calling)
            # Result 1 (rejected-permanent), source 1 (service user), diagnostic 3 (calling
            # AE title not recognized): PS3.8 Table 9-21.
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ
            # before the connection is closed, else the peer sees an abort instead.
            assoc.kill()


# pynetdicom's DUL thread sleeps this long whenever a pass finds nothing to do (1 ms by
# default). A sender waits for each C-STORE response, so that sleep is paid on every instance.
DUL_IDLE_SLEEP_SECONDS = 0.0002


def handle_conn_open(event: Event) -> None:
    event.assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_SECONDS
    # Small C-STORE responses otherwise wait on Nagle's algorithm and delayed ACKs (~40 ms each).
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
