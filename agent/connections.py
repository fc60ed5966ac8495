"""Closing an association's connection for sure, which pynetdicom's own close may not do."""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.association import Association


def close_connection(assoc: Association) -> None:
    """Shut down and close the association's socket.

    pynetdicom's AssociationSocket.close() calls shutdown() then close(), and skips close()
    when shutdown() fails, as it does once the peer has hung up first: the socket would leak.
    """
    sock = assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
    raw.close()
