"""Build and start the Storage SCP: every storage SOP class, the common transfer syntaxes."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, cast

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from agent import audit
from agent.dicom.uids import JPEG_XL_SYNTAXES
from agent.errors import ConfigError
from agent.receive.auditing import AssociationAudit
from agent.receive.handlers import (
    AccessControl,
    ArrivalSink,
    RejectWhileSpoolLow,
    StoreHandler,
    handle_conn_open,
    handle_echo,
)
from agent.receive.streamed import DatasetStreams
from agent.settings import ReceiverSettings
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.tls import accept, describe, server_context

log = logging.getLogger(__name__)

# pynetdicom accepts the first of these that the sender proposes, so the order is our preference
# (PS3.8 9.3.2.2 leaves the choice to the acceptor): lossless compressed first, so a sender never
# decompresses for us; then uncompressed; lossy last, so no sender is asked to compress lossily
# what it holds uncompressed. PS3.5 Annex A and Section 10 define them.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGLSLossless,
    uid.RLELossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.JPEG2000MCLossless,
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGLSNearLossless,
    uid.JPEG2000,
    uid.JPEG2000MC,
    uid.HTJ2K,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    # JPEG XL (PS3.5 A.4.13), which nothing on PyPI decodes yet: accepted last, only from a
    # sender that offers nothing else, so that such an instance is stored and its study ends
    # "skipped: no decoder for JPEG XL ..." rather than being refused and lost from view.
    *JPEG_XL_SYNTAXES,
)


def build_ae(settings: ReceiverSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_seconds
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.network_timeout_seconds
    # 1 MiB PDUs: fewer, larger reads for 512x512 slices (PS3.8 D.1 lets the receiver choose).
    ae.maximum_pdu_size = 1024 * 1024
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, context.abstract_syntax), list(TRANSFER_SYNTAXES))
    for sop_class in settings.private_sop_classes:
        _register_private_storage(sop_class)
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def _register_private_storage(sop_class: str) -> None:
    """Make pynetdicom route C-STORE of a vendor's private SOP class to the storage service.

    pynetdicom dispatches a C-STORE by the SOP class's service, and knows only the standard
    classes; registration is per process and idempotent.
    """
    if uid_to_service_class(sop_class) is StorageServiceClass:
        return
    register_uid(sop_class, "PrivateStorage_" + sop_class.replace(".", "_"), StorageServiceClass)


class _SharedContexts(list[PresentationContext]):
    """The supported contexts, which every association shares instead of copying.

    pynetdicom deep-copies the server's contexts for each association. With every storage
    SOP class and all our transfer syntaxes (172 contexts, 3,600 syntaxes) that copy costs
    ~50 ms of one core per connection, a scanner's probe included. Negotiation only reads
    them (pynetdicom.presentation.negotiate_as_acceptor builds new result contexts).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContexts:
        return self


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, doing each TLS handshake in the connection's own thread.

    pynetdicom's own TLS support handshakes in the one thread that accepts connections, where a
    caller that connects and stays silent would hold up every other caller.
    """

    # socketserver's default backlog of 5 lets a burst of callers (a scanner, a modality
    # opening several associations at once) time out in connect() while the accepting
    # thread is busy; the kernel caps this at net.core.somaxconn.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, tls: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        self.tls = tls
        super().__init__(*args, **kwargs)
        self.contexts = _SharedContexts(self.contexts)

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if self.tls is not None and isinstance(request, socket.socket):
            peer = client_address[0] if isinstance(client_address, tuple) else client_address
            try:
                # The handshake counts against [receiver] acse_timeout_seconds, as the request.
                request = accept(self.tls, request, float(self.ae.acse_timeout or 30.0))
            except (ssl.SSLEOFError, ConnectionError) as exc:
                # Port probes and load-balancer checks connect and hang up: not worth a warning.
                log.debug("TLS handshake with %s ended: %s", peer, describe(exc))
                return
            except OSError as exc:
                log.warning("TLS handshake with %s failed: %s", peer, describe(exc))
                port = client_address[1] if isinstance(client_address, tuple) else None
                audit.tls_refused(audit.Peer(address=peer, port=port), describe(exc))
                return
        super().process_request_thread(request, client_address)


def _tls_context(settings: ReceiverSettings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    try:
        return server_context(settings.tls)
    except ConfigError as exc:
        raise ConfigError(f"[receiver.tls] {exc}") from exc


def start_receiver(
    settings: ReceiverSettings,
    layout: SpoolLayout,
    sink: ArrivalSink,
    watermark: Watermark | None = None,
) -> ThreadedAssociationServer:
    """Start listening in background threads; the caller shuts the server down.

    With a `watermark`, a spool short of free space answers C-STORE with 0xA700 and refuses new
    associations as transient until space returns.

    Raises ConfigError for an unusable TLS certificate, key or CA file (naming it), and
    OSError when the address cannot be bound.
    """
    tls = _tls_context(settings)
    if not settings.allowed_callers:
        log.warning(
            "receiver accepts associations from any calling AE title: set "
            "[receiver] allowed_callers to restrict it"
        )
    ae = build_ae(settings)
    # The assembler hears how each association ended for each study, as it hears arrivals.
    associations = AssociationAudit(report=sink)
    streams = DatasetStreams(layout.tmp, settings.max_instance_bytes)
    handlers: list[Any] = [
        (
            evt.EVT_C_STORE,
            StoreHandler(
                layout,
                sink,
                watermark=watermark,
                max_instance_bytes=settings.max_instance_bytes,
                record=associations.instance,
            ),
        ),
        (evt.EVT_C_ECHO, handle_echo),
        # Also checks the called AE title: pynetdicom's require_called_aet knows only the AE's
        # own title, not the aliases, and would answer after this handler anyway.
        (
            evt.EVT_REQUESTED,
            AccessControl(settings.allowed_callers, settings.called_ae_titles),
        ),
        # After access control, so that a stranger is refused for good, not asked to retry.
        *([(evt.EVT_REQUESTED, RejectWhileSpoolLow(watermark))] if watermark else []),
        (evt.EVT_CONN_OPEN, handle_conn_open),
        # Each C-STORE dataset to a temp file in the spool as it arrives, not to memory.
        (evt.EVT_CONN_OPEN, streams.opened),
        (evt.EVT_CONN_CLOSE, streams.closed),
        (evt.EVT_ABORTED, streams.closed),
        # The audit trail: accepted and rejected associations, what each one stored.
        *associations.handlers(),
    ]
    # make_server with a server class is pynetdicom's way to customise the server; what
    # AE.start_server(block=False) does besides is repeated here.
    server = ae.make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        server_class=AssociationServer,
        tls=tls,
    )
    # AE.shutdown() and the server's own shutdown() find the server in this list.
    ae._servers.append(server)
    thread = threading.Thread(
        target=make_target(server.serve_forever),
        name=f"receiver@{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    log.info(
        "receiver %s listening on %s:%d%s",
        settings.ae_title,
        *server.server_address[:2],
        _tls_note(settings),
    )
    return server


def _tls_note(settings: ReceiverSettings) -> str:
    if settings.tls is None:
        return ""
    if settings.tls.require_client_certificate:
        return " (DICOM TLS, client certificate required)"
    if settings.tls.ca_certificates is not None:
        return " (DICOM TLS, client certificate verified when given)"
    return " (DICOM TLS)"
