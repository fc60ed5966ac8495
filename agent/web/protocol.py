"""uvicorn's HTTP/1.1 protocol with bounds: connections held at once, time to send request
headers, and time a request body may stall.

uvicorn on its own accepts every connection and waits for a request's headers without end
(its keep-alive timeout covers idle connections between requests only), so a client that
opens connections and sends half a request holds a file descriptor each for as long as it
likes. Here a connection that has not sent its headers within the header timeout is closed,
an upload that stops arriving for the body timeout is closed, and past the connection limit a
new connection takes the place of the oldest one still waiting for its headers, or is closed
itself when every connection is busy with a request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.throttle import Throttle

log = logging.getLogger(__name__)

# How often each connection's deadlines are looked at, at most.
TICK_SECONDS = 1.0
# RFC 9110 15.5.9: the server did not receive a complete request in the time it would wait.
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one web port, and the throttle of what it logs about them."""

    max_connections: int
    header_timeout: float
    body_timeout: float
    # One line a minute per kind of closing, with how many it stands for.
    notes: Throttle = field(default_factory=lambda: Throttle(60.0))

    @property
    def tick(self) -> float:
        return min(TICK_SECONDS, self.header_timeout / 4, self.body_timeout / 4)

    def note(self, kind: str, message: str, *args: object) -> None:
        suppressed = self.notes.admit(kind)
        if suppressed:
            log.warning(message + " (and %d more since the last such line)", *args, suppressed)
        elif suppressed is not None:
            log.warning(message, *args)


class BoundedH11Protocol(H11Protocol):
    """H11Protocol that keeps to `limits`; `protocol_class` makes one for a given port."""

    limits: ClassVar[ConnectionLimits]

    # Loop time since which the connection waits for a request's headers; None while a
    # request is under way.
    _waiting_since: float | None = None
    _bytes_waiting = 0  # bytes of the next request's headers received so far
    _last_data = 0.0
    _timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        now = self.loop.time()
        self._waiting_since = self._last_data = now
        if len(self.connections) >= self.limits.max_connections and not self._replace_oldest():
            self._refused = True
            transport.abort()
            self.limits.note(
                "full",
                "web port: %d connections, all with a request under way: a new one was closed",
                len(self.connections),
            )
            return
        super().connection_made(transport)
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused:  # never counted, never set up
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._waiting_since is not None:
            self._bytes_waiting += len(data)
        super().data_received(data)
        self._update_waiting()

    def on_response_complete(self) -> None:
        self._waiting_since = self.loop.time()
        self._bytes_waiting = 0
        super().on_response_complete()
        self._update_waiting()  # a pipelined request may have started

    def _update_waiting(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self._waiting_since = None

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(self.limits.tick, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._waiting_since is not None:
            if now - self._waiting_since >= self.limits.header_timeout:
                self.limits.note(
                    "headers",
                    "web port: closed a connection that sent no complete request headers "
                    "within %s s",
                    self.limits.header_timeout,
                )
                self._close_waiting()
                return
        elif self.cycle is not None and self.cycle.more_body:
            if self.flow.read_paused:
                self._last_data = now  # we are not reading: the client is not the one stalling
            elif now - self._last_data >= self.limits.body_timeout:
                self.limits.note(
                    "body",
                    "web port: closed a connection whose request body stopped arriving for %s s",
                    self.limits.body_timeout,
                )
                self.transport.close()
                return
        self._schedule()

    def _close_waiting(self) -> None:
        """Close a connection between requests; a 408 where part of a request came."""
        if self._bytes_waiting:
            self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()
        else:
            self.transport.abort()
        # Not counted from now on: connection_lost follows on the next turn of the loop.
        self.connections.discard(self)

    def _replace_oldest(self) -> bool:
        """Close the oldest connection waiting for request headers; False when none is."""
        waiting = [
            c
            for c in self.connections
            if isinstance(c, BoundedH11Protocol)
            and c._waiting_since is not None
            and not c.transport.is_closing()
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since or 0.0)
        self.limits.note(
            "replaced",
            "web port: at its limit of %d connections: closed the oldest one waiting for its "
            "request headers",
            self.limits.max_connections,
        )
        oldest._close_waiting()
        return True


def protocol_class(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """A BoundedH11Protocol for one port: uvicorn builds protocols from a class it is given."""
    return type("PortProtocol", (BoundedH11Protocol,), {"limits": limits})
