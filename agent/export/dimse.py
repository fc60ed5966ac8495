"""C-STORE SCU export: one association per destination, exactly the SOP classes sent."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from agent.connections import (
    Refusal,
    RequestorAE,
    associate,
    close_connection,
    why_no_answer,
)
from agent.db.deliveries import ObjectStatus
from agent.dicom.files import read_header
from agent.errors import ConfigError, RetryableError
from agent.settings import DestinationSettings

log = logging.getLogger(__name__)


def _ae(calling_ae: str, destination: DestinationSettings) -> RequestorAE:
    """`timeout_seconds` bounds every wait: the connection (10 s at most), the answer to the
    association request (30 s at most), each C-STORE response."""
    timeout = destination.timeout_seconds
    ae = RequestorAE(ae_title=calling_ae)
    ae.connection_timeout = min(10.0, timeout)
    ae.acse_timeout = min(30.0, timeout)
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(ae: RequestorAE, destination: DestinationSettings) -> Association:
    """An established association, over TLS when the destination has a `tls` table.

    RetryableError says why none was established (a destination's refusal may be lifted by
    its administrator, so every one is retried); ConfigError names an unusable TLS file.
    """
    host, port, ae_title = _address(destination)
    who = f"destination {destination.name}"
    got = associate(ae, host, port, ae_title, destination.tls, who=who)
    if isinstance(got, Refusal):
        raise RetryableError(f"{who}: {got.reason}")
    return got


def _address(destination: DestinationSettings) -> tuple[str, int, str]:
    """Host, port and AE title of a dimse destination (the settings require all three)."""
    host, port, ae_title = destination.host, destination.port, destination.ae_title
    if host is None or port is None or ae_title is None:
        raise ConfigError(f"destination {destination.name} is not a DICOM (dimse) peer")
    return host, port, ae_title


def echo(destination: DestinationSettings, calling_ae: str) -> None:
    """C-ECHO the destination; RetryableError says why it failed."""
    ae = _ae(calling_ae, destination)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise RetryableError(f"destination {destination.name}: {why_no_answer(assoc, 'C-ECHO')}")
    if status.Status != 0x0000:
        raise RetryableError(
            f"destination {destination.name}: C-ECHO answered {describe_status(status.Status)}"
        )


def send(
    destination: DestinationSettings,
    calling_ae: str,
    files: Sequence[Path],
    record: Callable[[ObjectStatus], None],
) -> None:
    """C-STORE each file to the destination, handing every instance's answer to `record`.

    An answer is recorded whatever it says; RetryableError means the association could not be
    made or broke off (the files not yet answered are simply not recorded).
    """
    if not files:
        return
    headers = [read_header(path) for path in files]
    ae = _ae(calling_ae, destination)
    contexts: dict[str, set[str]] = {}
    for ds in headers:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), set())
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in sorted(contexts.items()):
        # Offer the files' own syntax first; Explicit and Implicit VR LE let pynetdicom convert.
        ordered = sorted(syntaxes) + [
            s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s not in syntaxes
        ]
        ae.add_requested_context(sop_class, ordered)
    assoc = _associate(ae, destination)
    try:
        for path, ds in zip(files, headers, strict=True):
            response = assoc.send_c_store(path)
            if not response or "Status" not in response:
                # No answer: the association was aborted or timed out under this instance.
                why = why_no_answer(assoc, f"C-STORE of {ds.Modality}")
                raise RetryableError(f"destination {destination.name}: {why}")
            record(
                ObjectStatus(
                    str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID),
                    int(response.Status),
                    str(response.get("ErrorComment", "")),
                )
            )
    finally:
        if assoc.is_established:
            assoc.release()
        close_connection(assoc)


def describe_status(code: int) -> str:
    """0xA700 (Refused: Out of Resources): the code and PS3.4's words for it."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    words = (known[1] or known[0]) if known else ""
    return f"0x{code:04X} ({words})" if words else f"0x{code:04X}"
