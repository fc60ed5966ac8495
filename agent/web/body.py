"""Refusing a request whose body is still coming: read a bounded part of it away first.

An HTTP server that answers before reading the body and then closes the connection leaves the
unread bytes in its socket, and the kernel answers them with a reset; the client, still
sending, sees "connection reset" instead of the 401 or 415 it was sent. Reading (and
dropping) up to a few megabytes lets a typical refused upload see its answer without letting a
stranger make the service read without end.
"""

from __future__ import annotations

from starlette.types import Receive

DRAIN_LIMIT_BYTES = 16 * 1024 * 1024


async def drain(receive: Receive, limit: int = DRAIN_LIMIT_BYTES) -> None:
    """Read and drop the request body until it ends, the client leaves, or `limit` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return  # http.disconnect
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
