"""C-STORE, C-ECHO and association handlers: each returns a DICOM status and never raises."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from agent.connections import close_connection, close_reliably
from agent.db.values import SenderNews
from agent.dicom.files import DEFAULT_MAX_BYTES
from agent.dicom.inflate import CorruptDeflate, InflatedTooLarge, check_inflated_size
from agent.dicom.uids import is_valid_uid
from agent.receive.auditing import record_rejection
from agent.receive.identify import Unreadable, identify_file, missing_uids
from agent.receive.reads import bound_reads
from agent.receive.streamed import StreamedDataset
from agent.settings import AllowedCaller, IpNetwork
from agent.spool.arrival import NotAdmitted, Refusal, admit
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.spool.writer import move_atomic

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1 (Storage Service Class C-STORE statuses).
SUCCESS = 0x0000
# PS3.7 C.4.2 (general failure statuses): an instance with this SOP Instance UID is stored
# already, here in another series of the same study; sent again, it is refused again.
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_UIDS = 0xC001
UNEXPECTED = 0xC0FF

# Where arrivals go (the assembler's inbox), and with them how each association ended.
ArrivalSink = Callable[[SenderNews], None]
# Told each C-STORE's outcome: the association, the study (None if unread), the status sent.
StoreRecorder = Callable[[Association, str | None, int], None]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # ErrorComment is LO: 64 characters at most (PS3.7 C.4.2.1.1 and Annex C).
    ds.ErrorComment = comment[:64]
    return ds


class StoreHandler:
    """Writes each received instance to the spool, then acknowledges it.

    With a `watermark`, an instance arriving while the spool is low is refused before anything
    is written; so is a dataset larger than `max_instance_bytes`. `record` is told the outcome
    of each request, for the audit trail.
    """

    def __init__(
        self,
        layout: SpoolLayout,
        sink: ArrivalSink,
        *,
        watermark: Watermark | None = None,
        max_instance_bytes: int | None = None,
        record: StoreRecorder | None = None,
    ) -> None:
        self._layout = layout
        self._sink = sink
        self._watermark = watermark
        self._max_bytes = max_instance_bytes
        self._record = record

    def __call__(self, event: Event) -> int | Dataset:
        study_uid: str | None = None
        try:
            status, study_uid = self._store(event)
        except Exception:  # the boundary: the listener must survive anything
            log.exception("unexpected error storing an instance")
            status = _status(UNEXPECTED, "internal error, instance not stored")
        if self._record is not None:
            code = status if isinstance(status, int) else int(status.Status)
            self._record(event.assoc, study_uid, code)
        return status

    def _store(self, event: Event) -> tuple[int | Dataset, str | None]:
        """The response status, and the instance's study when it could be read."""
        request = cast(C_STORE, event.request)
        stream = request.DataSet
        if not isinstance(stream, StreamedDataset):
            return _status(CANNOT_UNDERSTAND, "no dataset in request"), None
        stream.claimed = True
        try:
            return self._store_streamed(event, request, stream)
        except OSError as exc:  # the temp file went away (an abort) or could not be read
            log.error("spool write failed: %s", exc.strerror)
            return _status(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}"), None
        finally:
            stream.discard()  # after the rename into the spool, there is nothing left to remove

    def _store_streamed(
        self, event: Event, request: C_STORE, stream: StreamedDataset
    ) -> tuple[int | Dataset, str | None]:
        refusal = self._refusal(stream.received)
        if refusal is not None:
            return refusal, None
        if stream.error is not None:
            return _status(OUT_OF_RESOURCES, f"spool write failed: {stream.error.strerror}"), None
        syntax = event.context.transfer_syntax
        with stream.dataset() as fp:
            try:
                ids = identify_file(fp, syntax)
            except Unreadable as exc:
                log.warning("rejected an instance: %s", exc)
                return _status(CANNOT_UNDERSTAND, str(exc)), None
            study_uid = ids.study_uid if is_valid_uid(ids.study_uid) else None
            if syntax == DeflatedExplicitVRLittleEndian:
                fp.seek(stream.dataset_offset)
                refused = self._inflated_refusal(fp)
                if refused is not None:
                    return refused, study_uid
        missing = missing_uids(ids)
        if missing:
            log.warning("rejected an instance: missing or invalid %s", ", ".join(missing))
            return _status(MISSING_UIDS, "missing or invalid " + ", ".join(missing)), study_uid
        # PS3.4 B.2.3: the dataset must be of the SOP Class and Instance the request names
        # (and the file meta group the stream wrote was made from the request).
        if ids.sop_class_uid != request.AffectedSOPClassUID:
            log.warning("rejected an instance: SOP Class differs from the request's")
            return _status(DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from request"), study_uid
        if ids.sop_uid != request.AffectedSOPInstanceUID:
            log.warning("rejected an instance: SOP Instance UID differs from the request's")
            return (
                _status(DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from request"),
                study_uid,
            )
        # Synced before the rename, the rename and its folder synced before the answer: an
        # acknowledged instance is on disk (the one write of its bytes was the stream's).
        failure = admit(
            self._layout, ids, partial(_synced_move, stream), self._sink, digest=stream.digest
        )
        if failure is not None:
            return _status(refusal_status(failure), failure.reason), study_uid
        return SUCCESS, study_uid

    def _refusal(self, size: int) -> Dataset | None:
        """0xA700 when the spool is low or the dataset is over the size limit, else None.

        PS3.4 B.2.3 has one status for "the SCP does not have enough resources to store the
        SOP Instance": A7xx, Refused: Out of Resources. A configured size cap is such a limit,
        so an oversized dataset gets it too; the Cxxx "cannot understand" family would send the
        sender's operator looking for an encoding fault that is not there. Either way the
        sender keeps the instance (nothing was acknowledged) and its log says why.
        """
        if self._watermark is not None:
            level = self._watermark.check()
            if level.low:  # logged once by the watermark, not once per instance
                return _status(OUT_OF_RESOURCES, level.reason)
        # The connection's StreamedDataset wrote no more than the limit meanwhile.
        if self._max_bytes is not None and size > self._max_bytes:
            log.warning(
                "refused an instance of %d bytes: the limit is %d bytes", size, self._max_bytes
            )
            return _status(OUT_OF_RESOURCES, f"instance over the {self._max_bytes}-byte limit")
        return None

    def _inflated_refusal(self, dataset: BinaryIO) -> Dataset | None:
        """0xA700 for a deflated dataset that inflates past the size limit, 0xC000 for a
        corrupt one, else None.

        The limit holds for the dataset as every later reader will see it: a deflated one of a
        megabyte can inflate to gigabytes (PS3.5 A.5), which no header read may be made to
        hold. It is inflated here once, counted and not kept.
        """
        limit = self._max_bytes or DEFAULT_MAX_BYTES
        try:
            check_inflated_size(dataset, limit)
        except InflatedTooLarge as exc:
            log.warning("refused an instance: %s", exc)
            return _status(OUT_OF_RESOURCES, str(exc))
        except CorruptDeflate as exc:
            log.warning("rejected an instance: %s", exc)
            return _status(CANNOT_UNDERSTAND, str(exc))
        return None


def refusal_status(failure: NotAdmitted) -> int:
    """The C-STORE status (and STOW-RS failure reason) of an instance `admit` refused."""
    if failure.refusal is Refusal.DUPLICATE:
        return DUPLICATE_SOP_INSTANCE
    return OUT_OF_RESOURCES


def _synced_move(stream: StreamedDataset, target: Path) -> None:
    move_atomic(stream.sync(), target)


class RejectWhileSpoolLow:
    """Rejects new associations as transient while the spool is low; PS3.8 Table 9-21.

    Register it after AccessControl (pynetdicom calls EVT_REQUESTED handlers in the order
    given): a caller that is not allowed is told so permanently rather than asked to come back,
    and an association another handler already rejected is left alone, so that no peer gets
    two A-ASSOCIATE-RJ PDUs.
    """

    def __init__(self, watermark: Watermark) -> None:
        self._watermark = watermark

    def __call__(self, event: Event) -> None:
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted:
            return
        level = self._watermark.check()
        if not level.low:
            return
        log.debug("association rejected as transient: %s", level.reason)
        # Result 2 (rejected-transient), source 3 (service provider, presentation related),
        # reason 1 (temporary congestion): the sender is to try again later, and does not
        # need to change anything (PS3.8 Table 9-21).
        reject(assoc, 0x02, 0x03, 0x01, level.reason)


def reject(assoc: Association, result: int, source: int, reason: int, why: str) -> None:
    """Send an A-ASSOCIATE-RJ and close; the audit trail records it with `why`.

    A peer that has already hung up makes the queued rejection an invalid event for the state
    machine; `_drop_on_protocol_error` ends such an association quietly.
    """
    record_rejection(assoc, result, source, reason, why)
    assoc.acse.send_reject(result, source, reason)
    # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ before
    # the connection is closed, else the peer sees an abort instead.
    assoc.kill()


def handle_echo(_event: Event) -> int:
    return SUCCESS


class AccessControl:
    """Admits an association only when it calls one of our AE titles, from an allowed caller.

    A refusal is an A-ASSOCIATE-RJ, rejected-permanent, source DICOM UL service-user, with
    reason 7 for a called AE title that is not ours and reason 3 for a caller not on the list
    (PS3.8 Table 9-21). The table has no reason for a known AE title calling from the wrong
    address, so that is reason 3 too; the log says which check failed.

    With no `called_ae_titles` any called AE title is accepted; with no `allowed` callers,
    anyone. Callers given by host name are resolved here, once, by `resolve` (default: the
    system resolver): a name that does not resolve admits nobody until the next start, and the
    log says so.
    """

    # PS3.8 Table 9-21, reasons for source 1 (DICOM UL service-user).
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07

    def __init__(
        self,
        allowed: tuple[AllowedCaller, ...],
        called_ae_titles: Collection[str] = (),
        *,
        resolve: Callable[[str], frozenset[str]] | None = None,
    ) -> None:
        self._called = frozenset(title.strip() for title in called_ae_titles)
        lookup = resolve or self.resolve_host
        # Per caller: the AE title and where it may call from (None: anywhere).
        self._rules: tuple[tuple[str, tuple[IpNetwork, ...] | None], ...] = tuple(
            (caller.ae_title.strip(), self._networks(caller, lookup)) for caller in allowed
        )

    @staticmethod
    def resolve_host(name: str) -> frozenset[str]:
        """The addresses a host name resolves to now; empty if it does not resolve."""
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            return frozenset()
        return frozenset(str(info[4][0]) for info in infos)

    @staticmethod
    def _networks(
        caller: AllowedCaller, resolve: Callable[[str], frozenset[str]]
    ) -> tuple[IpNetwork, ...] | None:
        if caller.host is None:
            return None
        if caller.network is not None:
            return (caller.network,)
        addresses = sorted(resolve(caller.host))
        if not addresses:
            log.error(
                "allowed caller %s: host name %s does not resolve; refused until restart",
                caller.ae_title,
                caller.host,
            )
        else:
            log.info(
                "allowed caller %s: host name %s is %s",
                caller.ae_title,
                caller.host,
                ", ".join(addresses),
            )
        # A link-local address comes with its zone (fe80::1%eth0), which networks do not take.
        return tuple(ipaddress.ip_network(address.split("%", 1)[0]) for address in addresses)

    def refusal(self, calling: str, called: str, address: str) -> tuple[int, str] | None:
        """The reject reason and what failed, or None when the association is admitted."""
        # Leading and trailing spaces of an AE title are not significant (PS3.8 Table 9-11).
        calling, called = calling.strip(), called.strip()
        if self._called and called not in self._called:
            return self.CALLED_AE_TITLE_NOT_RECOGNIZED, f"called AE title {called!r} is not ours"
        if not self._rules:
            return None
        places = [where for title, where in self._rules if title == calling]
        if not places:
            return (
                self.CALLING_AE_TITLE_NOT_RECOGNIZED,
                f"calling AE title {calling!r} is not an allowed caller",
            )
        ip = self._peer_ip(address)
        for where in places:
            if where is None or (ip is not None and any(ip in net for net in where)):
                return None
        return (
            self.CALLING_AE_TITLE_NOT_RECOGNIZED,
            f"calling AE title {calling!r} is not allowed from {address}",
        )

    @staticmethod
    def _peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """A peer's address; an IPv4 peer of a dual-stack listener shows as ::ffff:a.b.c.d."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    def __call__(self, event: Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive else "")
        called = str(primitive.called_ae_title if primitive else "")
        refusal = self.refusal(calling, called, str(assoc.requestor.address))
        if refusal is None:
            return
        reason, failed = refusal
        log.warning("association rejected: %s", failed)
        # Result 1 (rejected-permanent), source 1 (DICOM UL service-user): PS3.8 Table 9-21.
        reject(assoc, 0x01, 0x01, reason, failed)


# pynetdicom's DUL thread sleeps this long whenever a pass finds nothing to do (1 ms by
# default). A sender waits for each C-STORE response, so that sleep is paid on every instance.
DUL_IDLE_SLEEP_SECONDS = 0.0002
# For an AE configured without limits (pynetdicom's 0 and None): a PDU is bounded all the same.
DEFAULT_MAX_PDU_BYTES = 1024 * 1024
DEFAULT_READ_DEADLINE_SECONDS = 60.0


def _drop_on_protocol_error(assoc: Association) -> None:
    """End the association quietly when one of its protocol events cannot be handled.

    pynetdicom's DUL thread runs each state-machine event unguarded. A peer that hangs up
    while the acceptance or rejection of its request is on its way (a port scanner, a fuzzer)
    leaves that response an event invalid in the new state (PS3.8 Table 9-10, Sta13), and the
    InvalidEventError kills the thread with a traceback, leaving the socket to the garbage
    collector. Here the peer is logged in one line and its connection closed; other
    associations are not touched.

    A peer whose connection ends before a valid A-ASSOCIATE-RQ (garbage bytes, a truncated
    request, a scanner's probe) would hold its association slot until the ACSE timeout,
    because pynetdicom's acceptor waits that long for the request. The wait is ended as soon
    as the connection is gone, so a burst of such peers cannot fill max_associations.
    """
    dul = assoc.dul
    do_action: Callable[[str], None] = dul.state_machine.do_action
    woken = False

    def guarded(name: str) -> None:
        nonlocal woken
        try:
            do_action(name)
        except Exception as exc:  # the boundary for one hostile peer's protocol events
            log.info("dropped peer %s: %s: %s", assoc.requestor.address, type(exc).__name__, exc)
            # This runs in the DUL thread itself, so no join: flag both reactors to end and
            # close the connection here.
            dul._kill_thread = True
            assoc._kill = True
            close_connection(assoc)
            # PS3.8 answers an invalid event with an abort (AA-8); this path closes the socket
            # itself, so no EVT_CONN_CLOSE follows: tell the audit trail the association ended.
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            return
        # Sta1: no transport connection. Before a request arrived, the acceptor still waits
        # for one; an empty queue item reads to it as the ACSE timeout, and it ends at once.
        if not woken and dul.state_machine.current_state == "Sta1" and not assoc.is_established:
            woken = True
            if assoc.requestor.primitive is None:
                dul.to_user_queue.put(None)

    setattr(dul.state_machine, "do_action", guarded)  # noqa: B010 (mypy: a method)


def handle_conn_open(event: Event) -> None:
    _drop_on_protocol_error(event.assoc)
    close_reliably(event.assoc)
    ae = event.assoc.ae
    bound_reads(
        event.assoc,
        max_pdu_bytes=ae.maximum_pdu_size or DEFAULT_MAX_PDU_BYTES,
        deadline_seconds=float(ae.network_timeout or DEFAULT_READ_DEADLINE_SECONDS),
    )
    event.assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_SECONDS
    # Small C-STORE responses otherwise wait on Nagle's algorithm and delayed ACKs (~40 ms each).
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
