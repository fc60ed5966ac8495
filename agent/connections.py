"""Requesting an association (TLS, no Nagle delay, why it failed), and closing an association's
connection for sure, which pynetdicom's own close may not do.

pynetdicom's AssociationSocket.close() calls shutdown() then close() on the socket, and skips
close() when shutdown() fails, as it does once the peer has hung up first: the socket leaks
until the garbage collector finds it. On a listener that scanners and broken senders reach,
those are many.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from agent.errors import ConfigError
from agent.settings import DestinationTls
from agent.tls import client_context


@dataclass(frozen=True)
class Refusal:
    """Why no association was established: `reason` ("TLS failed: ...", "association rejected
    (...)", or "" when the connection itself failed), and whether asking again cannot help."""

    reason: str
    permanent: bool = False


def associate(
    ae: AE,
    host: str,
    port: int,
    ae_title: str,
    tls: DestinationTls | None,
    *,
    who: str,
    **kwargs: Any,
) -> Association | Refusal:
    """An established association with a peer we call (a destination, a source), over TLS
    when `tls` is given, or why not. ConfigError, naming `who`, for an unusable TLS file."""
    ctx = None
    tls_args = None
    if tls is not None:
        try:
            ctx = client_context(tls)
        except ConfigError as exc:
            raise ConfigError(f"{who}: TLS: {exc}") from exc
        tls_args = (ctx, tls.server_name or host)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args, **kwargs)
    if assoc.is_established:
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            # Each request (C-STORE, C-FIND, C-GET) waits for its response: without this,
            # Nagle's algorithm and the peer's delayed ACK add ~40 ms to every message (10 s
            # for a 300-slice study).
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc
    close_connection(assoc)
    if ctx is not None and ctx.failure is not None:
        return Refusal(f"TLS failed: {ctx.failure}")
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        rj = assoc.acceptor.primitive
        # PS3.8 Table 9-21: result, source and reason say who refused and why; result 1 is
        # rejected-permanent (say, our AE title is not known there), which asking again does
        # not change; 2 is transient.
        return Refusal(
            f"association rejected (result {rj.result}, source {rj.result_source}, "
            f"reason {rj.diagnostic})",
            permanent=rj.result == 0x01,
        )
    return Refusal("")


def _close(raw: socket.socket | None) -> None:
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
    raw.close()


def close_connection(assoc: Association) -> None:
    """Shut down and close the association's socket now."""
    sock = assoc.dul.socket
    _close(sock.socket if sock is not None else None)


def close_reliably(assoc: Association) -> None:
    """Make every close of this association's socket, pynetdicom's own included, a real one."""
    sock = assoc.dul.socket
    if sock is None:
        return
    # AssociationSocket.close() starts with _shutdown_socket(); give it one that always closes.
    setattr(sock, "_shutdown_socket", lambda: _close(sock.socket))  # noqa: B010
