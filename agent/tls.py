"""TLS contexts for DICOM connections, both ways: PS3.15 Annex B profiles, TLS 1.2 or later."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.settings import DestinationTls, ReceiverTls, SecretRef

# RFC 8996 (BCP 195) retires TLS 1.0 and 1.1, and so do the BCP 195 TLS profiles of PS3.15
# Annex B. Python's default cipher list (forward secrecy only, no SHA-1 MACs) holds the suites
# those profiles require, so it is kept.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(tls: ReceiverTls) -> ssl.SSLContext:
    """The listener's context; a ConfigError names the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_identity(ctx, tls.certificate, tls.private_key, tls.private_key_password)
    if tls.ca_certificates is not None:
        _load_trust(ctx, tls.ca_certificates)
        # CERT_OPTIONAL still refuses a client certificate that does not verify.
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def accept(ctx: ssl.SSLContext, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    """Complete the server side of the handshake on an accepted connection within `timeout`.

    Raises OSError (ssl.SSLError, TimeoutError, a reset), having closed the connection.
    """
    sock.settimeout(timeout)
    try:
        secured = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError:
        sock.close()
        raise
    try:
        secured.do_handshake()
    except OSError:
        secured.close()
        raise
    # pynetdicom reads accepted connections in blocking mode and keeps its own timers
    # (ARTIM, PS3.8 9.1.5; the network timeout) rather than socket timeouts.
    secured.settimeout(None)
    return secured


class _ClientSocket(ssl.SSLSocket):
    """Leaves the reason for a TLS failure on its ClientContext.

    A connection whose handshake (or TCP connect) failed is closed here: pynetdicom forgets it
    unclosed (its shutdown() fails on it, and close() is skipped).
    """

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as exc:
            # The TCP connection itself (refused, no route): a TLS failure is kept already.
            context = self.context
            if isinstance(context, ClientContext) and context.failure is None:
                context.connect_failure = exc
            self.close()
            raise

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._record(exc)
            self.close()
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            # With TLS 1.3 a server refuses the client's certificate after the client's side of
            # the handshake has completed: the refusal arrives with the first read.
            self._record(exc)
            raise

    def _record(self, exc: OSError) -> None:
        if isinstance(self.context, ClientContext):
            self.context.failure = describe(exc)


class ClientContext(ssl.SSLContext):
    """A client context that keeps why its connection's TLS failed, for the error message.

    pynetdicom logs a failed handshake and reports only that the association was not
    established; one context serves one association, so `failure` is that association's.
    """

    sslsocket_class = _ClientSocket
    failure: str | None = None
    connect_failure: OSError | None = None  # the TCP connection's, before any TLS


def client_context(tls: DestinationTls) -> ClientContext:
    """A context for connecting to a destination; a ConfigError names the file at fault."""
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    # PROTOCOL_TLS_CLIENT always verifies the chain; only the name check is optional.
    ctx.check_hostname = tls.verify_hostname
    if tls.ca_certificates is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_trust(ctx, tls.ca_certificates)
    if tls.certificate is not None and tls.private_key is not None:
        _load_identity(ctx, tls.certificate, tls.private_key, tls.private_key_password)
    return ctx


_BRACKETED = re.compile(r"^\[[^\]]*\]\s*")
_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def describe(exc: OSError) -> str:
    """A TLS or connection failure in a few words, e.g. "certificate verify failed: ..."."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        return _BRACKETED.sub("", _LOCATION.sub("", text)) or type(exc).__name__
    return exc.strerror or type(exc).__name__


def _read(path: Path, what: str) -> None:
    try:
        path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _load_trust(ctx: ssl.SSLContext, path: Path) -> None:
    _read(path, "CA certificates")
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"CA certificates {path}: no PEM certificate in the file") from exc


def _load_identity(
    ctx: ssl.SSLContext, certificate: Path, private_key: Path, password: SecretRef | None
) -> None:
    _read(certificate, "certificate")
    _read(private_key, "private key")
    # Parsed alone first, so that a fault is pinned on the right one of the two files.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certificate)
    except ssl.SSLError as exc:
        raise ConfigError(f"certificate {certificate}: no PEM certificate in the file") from exc
    secret = password.reveal() if password is not None else None

    def supply() -> str:
        # Without a password OpenSSL would ask for one on the terminal and wait.
        if secret is None:
            raise ConfigError(
                f"private key {private_key} is encrypted: set private_key_password "
                '(as { file = "..." } or { env = "..." })'
            )
        return secret.get_secret_value()

    try:
        ctx.load_cert_chain(certificate, private_key, password=supply)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"private key {private_key} does not belong to certificate {certificate}"
            ) from exc
        unlocked = f", or the password from {password} is wrong" if password is not None else ""
        raise ConfigError(f"private key {private_key}: not a PEM private key{unlocked}") from exc
