"""Build and start the Storage SCP: every storage SOP class, the common transfer syntaxes."""

from __future__ import annotations

import logging
from typing import Any, cast

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import ThreadedAssociationServer

from agent.receive.handlers import (
    AccessControl,
    ArrivalSink,
    StoreHandler,
    handle_conn_open,
    handle_echo,
)
from agent.settings import ReceiverSettings
from agent.spool.layout import SpoolLayout

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
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
)


def build_ae(settings: ReceiverSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_seconds
    ae.acse_timeout = 30
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


def start_receiver(
    settings: ReceiverSettings, layout: SpoolLayout, sink: ArrivalSink
) -> ThreadedAssociationServer:
    """Start listening in background threads; the caller shuts the server down."""
    if not settings.allowed_callers:
        log.warning(
            "receiver accepts associations from any calling AE title: set "
            "[receiver] allowed_callers to restrict it"
        )
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, StoreHandler(layout, sink)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, AccessControl(settings.allowed_callers)),
        (evt.EVT_CONN_OPEN, handle_conn_open),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    assert server is not None
    log.info(
        "receiver %s listening on %s:%d",
        settings.ae_title,
        *server.server_address[:2],
    )
    return server
