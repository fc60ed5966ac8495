"""One configured archive as a DICOM peer: C-FIND to search and count, C-GET to retrieve."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from datetime import date
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from pynetdicom.status import code_to_category

from agent.connections import Refusal, RequestorAE, associate, close_connection
from agent.errors import ConfigError
from agent.pull.checks import Refused, checked
from agent.pull.source import (
    FoundStudy,
    SourceRefused,
    SourceUnavailable,
    StudyNotFound,
    StudyRow,
    count_in,
    matching,
    poll_queries,
)
from agent.receive.filemeta import encode_file_meta
from agent.receive.handlers import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, UNEXPECTED
from agent.receive.reads import CappedDataset, bound_datasets
from agent.receive.scp import TRANSFER_SYNTAXES
from agent.settings import SourcePoll, SourceSettings

log = logging.getLogger(__name__)

# The storage SOP classes a C-GET can bring back (PS3.4 Annex B.5), each on a presentation
# context of its own with us in the SCP role (PS3.7 D.3.3.4). An association has at most 128
# contexts (PS3.8 9.3.2.2: odd IDs 1 to 255); pynetdicom's AllStoragePresentationContexts
# (about 170) do not fit, so these are the image, segmentation and SR classes a study for the
# models is made of. An instance of another class is a failed sub-operation, which the C-GET's
# final status counts (warning 0xB000) and the log reports.
STORAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.2",  # Color Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image, for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image, for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image, for processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
)
# PS3.4 C.4.1.1.4 and C.4.3.1.4: pending statuses of C-FIND and C-GET.
_PENDING = (0xFF00, 0xFF01)
_CANCEL = 0xFE00
# Instances received and not yet written: the handler waits (and so does the archive) beyond.
_QUEUED = 4


class DimseSource:
    """A DICOM archive reached by association; each call makes (and releases) its own."""

    def __init__(
        self,
        settings: SourceSettings,
        calling_ae: str,
        *,
        timeout: float | None = None,
        max_instance_bytes: int | None = None,
    ) -> None:
        host, port, ae_title = settings.host, settings.port, settings.ae_title
        if host is None or port is None or ae_title is None:
            raise ConfigError(f"source {settings.name} is not a DICOM (dimse) peer")
        self.settings = settings
        self._address = (host, port, ae_title)
        self._calling_ae = calling_ae
        # A retrieved instance past this is read and dropped, not held, and refused (0xA700).
        self._max_bytes = max_instance_bytes
        # The count check runs on the assembler's thread: it must not wait a minute for a reply.
        self._timeout = settings.timeout_seconds
        if timeout is not None:
            self._timeout = min(timeout, self._timeout)

    @property
    def name(self) -> str:
        return self.settings.name

    def instance_count(self, study_uid: str) -> int | None:
        rows = self._find([_study_query(StudyInstanceUID=study_uid)], limit=2)
        return count_in(map(_row, rows), study_uid, f"C-FIND at {self.name}")

    def search(self, poll: SourcePoll, today: date) -> list[FoundStudy]:
        queries = [_study_query(**keys) for keys in poll_queries(poll, today)]
        return matching(map(_row, self._find(queries, limit=poll.limit)), poll)

    def instances(self, study_uid: str) -> Iterator[bytes]:
        what = f"C-GET from {self.name}"
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
        roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_CLASSES]
        received = _Received()
        assoc = self._associate(ae, what, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, received)])
        if self._max_bytes is not None:
            bound_datasets(assoc, max_bytes=self._max_bytes)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        # The C-GET runs on a thread of its own: its C-STOREs arrive while the puller writes
        # the previous instances, and wait for it when it falls behind.
        final: list[Dataset | None] = []
        getter = threading.Thread(
            target=_run_get, args=(assoc, query, received, final), name="c-get", daemon=True
        )
        getter.start()
        delivered = 0
        try:
            while True:
                try:
                    part = received.parts.get(timeout=0.1)
                except queue.Empty:
                    if received.finished.is_set() and received.parts.empty():
                        break
                    continue
                delivered += 1
                yield part
        finally:
            received.stopped.set()
            if getter.is_alive():
                assoc.abort()  # the puller gave up: end the retrieval now
            getter.join(timeout=self._timeout)
            close_connection(assoc)
        _check_get(final[0] if final else None, delivered, what)

    def _ae(self) -> RequestorAE:
        ae = RequestorAE(ae_title=self._calling_ae)
        ae.acse_timeout = self._timeout
        ae.dimse_timeout = self._timeout
        ae.network_timeout = self._timeout
        ae.connection_timeout = min(10.0, self._timeout)
        return ae

    def _associate(self, ae: RequestorAE, what: str, **kwargs: Any) -> Association:
        """An established association, over TLS when the source has a `tls` table; raises
        SourceUnavailable (or SourceRefused for a permanent rejection) otherwise."""
        host, port, ae_title = self._address
        got = associate(
            ae, host, port, ae_title, self.settings.tls, who=f"source {self.name}", **kwargs
        )
        if isinstance(got, Refusal):
            message = f"{what}: {got.reason}"
            raise SourceRefused(message) if got.permanent else SourceUnavailable(message)
        return got

    def _find(self, queries: Sequence[Dataset], *, limit: int) -> list[Dataset]:
        """Every match of the queries (each cut at `limit`), on one association."""
        what = f"C-FIND at {self.name}"
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, what)
        model = StudyRootQueryRetrieveInformationModelFind
        rows: list[Dataset] = []
        try:
            for msg_id, query in enumerate(queries, start=1):
                matches = 0
                for status, identifier in assoc.send_c_find(query, model, msg_id=msg_id):
                    code = _code(status)
                    if code is None:
                        raise SourceUnavailable(f"{what}: no answer (aborted or timed out)")
                    if code in _PENDING:
                        matches += 1
                        if identifier is not None and matches <= limit:
                            rows.append(identifier)
                        if matches == limit + 1:
                            # PS3.4 C.4.1.2.3: enough; the archive answers with Cancel.
                            assoc.send_c_cancel(msg_id, query_model=model)
                    elif code not in (SUCCESS, _CANCEL):
                        raise _failure(code, what)
        finally:
            if assoc.is_established:
                assoc.release()
            close_connection(assoc)
        return rows


class _Received:
    """The C-STORE handler of one C-GET: checks each dataset as the receiver does, and hands
    it on as a Part 10 file through a short queue. Returns a status, never raises."""

    def __init__(self) -> None:
        self.parts: queue.Queue[bytes] = queue.Queue(maxsize=_QUEUED)
        self.stopped = threading.Event()
        self.finished = threading.Event()

    def __call__(self, event: Event) -> int:
        try:
            return self._store(event)
        except Exception:  # the boundary: a status for the archive, whatever happened
            log.exception("unexpected error taking a retrieved instance")
            return UNEXPECTED

    def _store(self, event: Event) -> int:
        request = cast(C_STORE, event.request)
        if not isinstance(request.DataSet, BytesIO):
            return CANNOT_UNDERSTAND
        if isinstance(request.DataSet, CappedDataset) and request.DataSet.overflowed:
            log.warning(
                "refused a retrieved instance of %d bytes: the limit is %d bytes",
                request.DataSet.received,
                request.DataSet.limit,
            )
            return OUT_OF_RESOURCES
        raw = request.DataSet.getvalue()
        syntax = event.context.transfer_syntax
        try:
            ids = checked(raw, syntax, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
        except Refused as exc:
            log.warning("refused a retrieved instance: %s", exc)
            return exc.status
        # The puller checks and writes it as it does a WADO-RS part; no source AE title is
        # kept, as for any pulled instance (it is never checked by count).
        part = encode_file_meta(ids.sop_class_uid, ids.sop_uid, str(syntax), "") + raw
        while not self.stopped.is_set():
            try:
                self.parts.put(part, timeout=0.1)
                return SUCCESS
            except queue.Full:
                continue
        return OUT_OF_RESOURCES  # the pull was given up: the rest is not wanted


def _run_get(
    assoc: Association, query: Dataset, received: _Received, final: list[Dataset | None]
) -> None:
    """Send the C-GET and keep its last response (None when none came); the getter thread."""
    last: Dataset | None = None
    try:
        for status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            last = status if _code(status) is not None else None
            if last is None:
                break
        if assoc.is_established:
            assoc.release()
    except (RuntimeError, ValueError, OSError) as exc:  # what pynetdicom's send_c_get raises
        log.error("C-GET failed: %s: %s", type(exc).__name__, exc)
        last = None
    finally:
        final.append(last)
        received.finished.set()


def _check_get(status: Dataset | None, delivered: int, what: str) -> None:
    """Raise for a C-GET that did not end well (PS3.4 C.4.3.1.4); log failed sub-operations."""
    code = _code(status)
    if status is None or code is None:
        raise SourceUnavailable(f"{what}: no answer (aborted or timed out)")
    completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    warned = int(status.get("NumberOfWarningSuboperations", 0) or 0)
    if code in (SUCCESS, 0xB000):
        if failed:
            log.warning("%s: %d instances not retrieved (%d sent)", what, failed, completed)
        if delivered == 0 and completed + failed + warned == 0:
            raise StudyNotFound(f"{what}: the study is not there")
        return
    raise _failure(code, what)


def _failure(code: int, what: str) -> SourceUnavailable | SourceRefused:
    """A C-FIND or C-GET failure status as an error: out of resources and cancel may pass."""
    message = f"{what}: status 0x{code:04X} ({code_to_category(code)})"
    if code == _CANCEL or code >> 8 == 0xA7:
        return SourceUnavailable(message)
    return SourceRefused(message)


def _code(status: Dataset | None) -> int | None:
    # pynetdicom answers an aborted or timed-out operation with an empty Dataset.
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def _study_query(**matching: str) -> Dataset:
    """A STUDY-level query: the given matching keys, and the return keys the sources need."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.StudyDate = ""
    ds.StudyDescription = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


def _row(ds: Dataset) -> StudyRow:
    return StudyRow(
        _text(ds, "StudyInstanceUID"),
        _text(ds, "StudyDescription"),
        _int(ds, "NumberOfStudyRelatedInstances"),
    )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(str(ds.get(keyword, "")).strip())
    except ValueError:
        return None
