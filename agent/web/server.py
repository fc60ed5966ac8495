"""The web port: uvicorn serving the application in a background thread of `serve`."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import threading
import time
from functools import partial
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from agent.errors import ConfigError
from agent.settings import WebSettings
from agent.tls import server_context
from agent.web.app import WebServices, create_app
from agent.web.auth import Authenticator
from agent.web.limits import connection_cap, current
from agent.web.protocol import ConnectionLimits, protocol_class

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
# On stop, requests under way get this long to finish; an upload cut off stores nothing.
GRACEFUL_STOP_SECONDS = 10
MAX_ACCEPT_BATCH = 32


def _tls_context(settings: WebSettings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    try:
        return server_context(settings.tls)  # TLS 1.2 or later, as the receiver's
    except ConfigError as exc:
        raise ConfigError(f"[web.tls] {exc}") from exc


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is an OSError for the caller."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class _BoundedHandshakes(asyncio.SelectorEventLoop):
    """An event loop whose TLS servers give a client `seconds` to finish its handshake.

    The connection limit and the header timeout (agent.web.protocol) start once the protocol
    has the connection, which with TLS is after the handshake; asyncio's own bound is 60 s, so
    a client opening connections and sending nothing held a descriptor each for a minute.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._handshake_seconds = seconds

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self._handshake_seconds)
        return await super().create_server(*args, **kwargs)


class WebServer:
    """uvicorn on a socket bound at construction; `start` runs it, `stop` ends it.

    Raises ConfigError for an unusable certificate or key and OSError when the address cannot
    be bound, both before any thread starts.
    """

    def __init__(
        self, app: ASGIApp, settings: WebSettings, max_connections: int | None = None
    ) -> None:
        tls = _tls_context(settings)
        self.limits = ConnectionLimits(
            max_connections=max_connections or settings.max_connections,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
        )
        self._socket = _bind(settings.host, settings.port)
        self.host = settings.host
        self.port: int = self._socket.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        config = uvicorn.Config(
            app,
            loop="asyncio",
            # h11 with the bounds of agent.web.protocol: connections, header and body time.
            http=protocol_class(self.limits),
            ws="none",
            lifespan="off",
            # The service's own logging, untouched; no access log, whose paths hold study UIDs.
            log_config=None,
            access_log=False,
            server_header=False,
            # No proxy is assumed in front: X-Forwarded-For from loopback would otherwise
            # replace the client address that the audit trail records.
            proxy_headers=False,
            timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS,
            # asyncio accepts up to `backlog` connections at a time before any of them reaches
            # the protocol, which is where the connection limit is kept: a small batch keeps
            # the descriptors held past the limit small too (uvicorn's default is 2,048).
            backlog=min(self.limits.max_connections, MAX_ACCEPT_BATCH),
        )
        config.load()
        # Our own context rather than uvicorn's options: TLS 1.2 at least, client certificates
        # and key passwords handled as on the DICOM port.
        config.ssl = tls
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def connections(self) -> list[object]:
        """The connections open now (for tests and diagnostics)."""
        return list(self._server.server_state.connections)

    def _run(self) -> None:
        # uvicorn's own run() with our loop: the handshake has the header timeout's bound.
        factory = partial(_BoundedHandshakes, self.limits.header_timeout)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._server.serve(sockets=[self._socket]))
        except BaseException:  # the thread's boundary: say why the port went away
            log.exception("web server stopped on an error")

    def start(self) -> None:
        """Run the server and wait until it serves; OSError if it does not come up."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"web server on {self.url} did not start")
            time.sleep(0.01)
        log.info("web port listening on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(GRACEFUL_STOP_SECONDS + 5)
        self._socket.close()


def start_web(services: WebServices) -> WebServer:
    """Build the application from `services` and serve it on the [web] address.

    Raises ConfigError (a secret, certificate or key that cannot be used) or OSError (the
    address cannot be bound).
    """
    web = services.settings.web
    authenticator = Authenticator.from_settings(web)
    if not authenticator.configured:
        log.warning(
            "web port: no [web] tokens or users and allow_anonymous is false: every request "
            "but /api/health is refused with 401"
        )
    if authenticator.users and web.tls is None and not _loopback(web.host):
        log.warning("web port: Basic passwords cross the network unencrypted: add [web.tls]")
    cap = connection_cap(services.settings, current())
    server = WebServer(create_app(services, authenticator), web, max_connections=cap)
    server.start()
    return server


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
