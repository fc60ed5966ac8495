"""Closing an association's connection for sure, which pynetdicom's own close may not do.

pynetdicom's AssociationSocket.close() calls shutdown() then close() on the socket, and skips
close() when shutdown() fails, as it does once the peer has hung up first: the socket leaks
until the garbage collector finds it. On a listener that scanners and broken senders reach,
those are many.
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.association import Association


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
