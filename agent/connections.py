"""Requesting an association (TLS, no Nagle delay, why it failed), and closing an association's
connection for sure, which pynetdicom's own close may not do.

Why a request failed is told in words an operator can act on: connection refused at host:port,
no answer within N s, the peer's A-ASSOCIATE-RJ reason (PS3.8 Table 9-21), an abort, a TLS
error. pynetdicom only logs why its TCP connect failed, so the sockets of a RequestorAE keep it.

pynetdicom's AssociationSocket.close() calls shutdown() then close() on the socket, and skips
close() when shutdown() fails, as it does once the peer has hung up first: the socket leaks
until the garbage collector finds it. On a listener that scanners and broken senders reach,
those are many.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.transport import AddressInformation, AssociationSocket

from agent.errors import ConfigError
from agent.settings import DestinationTls
from agent.tls import ClientContext, client_context

# PS3.8 Table 9-21, A-ASSOCIATE-RJ: (source, reason) in words. Source 1 is the called AE (the
# service user), 2 its ACSE and 3 its presentation layer (both service provider).
_REJECTION = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title {calling} not recognized",
    (1, 7): "called AE title {called} not recognized",
    (2, 1): "no reason given by its ACSE",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Refusal:
    """Why no association was established ("connection refused at 127.0.0.1:104",
    "association rejected by PACS: ...", "TLS error: ..."), and whether asking again cannot
    help (a rejection the peer calls permanent)."""

    reason: str
    permanent: bool = False


class _Connecting(socket.socket):
    """A TCP socket that keeps why its connect() failed."""

    failure: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.failure = exc
            raise


class _WatchedSocket(AssociationSocket):
    """pynetdicom's socket, on a TCP socket that keeps why its connection failed: pynetdicom
    logs the error and forgets it (and the socket, unclosed)."""

    tcp: _Connecting | None = None

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        made = super()._create_socket(address)
        timeout = made.gettimeout()
        tcp = _Connecting(made.family, made.type, made.proto, made.detach())
        tcp.settimeout(timeout)
        self.tcp = tcp
        return tcp

    def connect_failure(self) -> OSError | None:
        """Why the TCP connection failed; a TLS connection's wrapped socket keeps it on its
        context (ClientContext.connect_failure)."""
        if self.tcp is not None and self.tcp.failure is not None:
            return self.tcp.failure
        context = self.tls_args[0] if self.tls_args else None
        return context.connect_failure if isinstance(context, ClientContext) else None


class RequestorAE(AE):
    """An AE whose association requests can say why they failed (see `associate`)."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = _WatchedSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class _Watch:
    """What the requesting side saw of one association request that pynetdicom does not keep:
    whether the connection opened, and an abort from the peer."""

    def __init__(self) -> None:
        self.opened = False
        self.abort: A_ABORT | A_P_ABORT | None = None

    def handlers(self) -> list[tuple[evt.EventType, Any]]:
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._received)]

    def _opened(self, event: Event) -> None:
        self.opened = True

    def _received(self, event: Event) -> None:
        primitive = vars(event).get("primitive")  # set per event kind, unknown to the stubs
        if isinstance(primitive, (A_ABORT, A_P_ABORT)):
            self.abort = primitive


def associate(
    ae: RequestorAE,
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
    watch = _Watch()
    handlers = [*kwargs.pop("evt_handlers", []), *watch.handlers()]
    assoc = ae.associate(
        host, port, ae_title=ae_title, tls_args=tls_args, evt_handlers=handlers, **kwargs
    )
    if assoc.is_established:
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            # Each request (C-STORE, C-FIND, C-GET) waits for its response: without this,
            # Nagle's algorithm and the peer's delayed ACK add ~40 ms to every message (10 s
            # for a 300-slice study).
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc
    close_connection(assoc)
    sock = assoc.dul.socket
    failure = None
    if isinstance(sock, _WatchedSocket):
        failure = sock.connect_failure()
        if sock.tcp is not None:
            sock.tcp.close()  # a failed connect leaves it open in pynetdicom
    if ctx is not None and ctx.failure is not None:
        return Refusal(f"TLS error: {ctx.failure}")
    if not watch.opened:
        return Refusal(_unreachable(failure, host, port, assoc.connection_timeout))
    return _refusal(assoc, watch, ae_title, host, port)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unreachable(failure: OSError | None, host: str, port: int, timeout: float | None) -> str:
    """Why the TCP connection was not made, e.g. "connection refused at 127.0.0.1:104"."""
    where = _where(host, port)
    if isinstance(failure, ConnectionRefusedError):
        return f"connection refused at {where}"
    if isinstance(failure, TimeoutError):
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"no answer from {where}{within}"
    if failure is not None and failure.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {where}"
    if failure is not None:
        return f"cannot connect to {where}: {failure.strerror or type(failure).__name__}"
    return f"cannot connect to {where}"


def _refusal(assoc: Association, watch: _Watch, ae_title: str, host: str, port: int) -> Refusal:
    """Why an association whose connection opened was not established."""
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and isinstance(answer, A_ASSOCIATE):
        source, reason = int(answer.result_source or 0), int(answer.diagnostic or 0)
        words = _REJECTION.get((source, reason), f"reason {reason}, source {source}").format(
            calling=assoc.requestor.ae_title, called=ae_title
        )
        # Result 1 is rejected-permanent (say, our AE title is not known there): asking again
        # does not change it; 2 is transient.
        permanent = answer.result == 0x01
        kind = "permanent" if permanent else "transient"
        return Refusal(f"association rejected by {ae_title}: {words} ({kind})", permanent)
    if isinstance(answer, A_ASSOCIATE) and answer.result == 0x00:
        # Accepted, with none of the presentation contexts proposed (PS3.8 9.3.3.2).
        return Refusal(f"{ae_title} accepted none of the SOP classes and transfer syntaxes offered")
    if isinstance(watch.abort, A_ABORT):
        return Refusal(f"association aborted by {ae_title} at {_where(host, port)}")
    if isinstance(watch.abort, A_P_ABORT):
        return Refusal(f"connection closed by {_where(host, port)} during association request")
    timeout = assoc.acse_timeout
    within = f" within {timeout:g} s" if timeout is not None else ""
    return Refusal(f"no answer to the association request from {_where(host, port)}{within}")


def why_no_answer(assoc: Association, what: str) -> str:
    """Why a request on an established association got no answer: "no answer to C-STORE of SR
    within 60 s" (pynetdicom aborts the association when its DIMSE timeout passes), or the
    peer aborted it or closed the connection."""
    if getattr(assoc, "_sent_abort", False):  # pynetdicom 3.0: it sent the A-ABORT itself
        timeout = assoc.dimse_timeout
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"no answer to {what}{within}"
    return f"association aborted by the peer during {what}"


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
