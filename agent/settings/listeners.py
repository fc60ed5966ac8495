"""The ports pacs-agent listens on: the DICOM receiver and the HTTP port, their TLS and callers."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from agent.settings.base import AeTitle, SecretRef, UidStr, _Section

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowedCaller(_Section):
    """A peer allowed to associate: its calling AE title and, optionally, where it calls from.

    `host` is an IP address, a network in CIDR notation (IPv4 or IPv6), or a host name, which
    the receiver resolves once when it starts.
    """

    ae_title: AeTitle
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        try:
            ipaddress.ip_network(value)
            return value
        except ValueError as exc:
            if "/" in value or ":" in value:
                hint = ""
                if "host bits set" in str(exc):
                    hint = f": write the network, {ipaddress.ip_network(value, strict=False)}"
                raise ValueError(f"{value} is not an IP address or network ({exc}){hint}") from None
        # RFC 1123 2.1: a name's last label is never all digits, so "10.1.2" is a typo, not a name.
        last_label = value.rstrip(".").rsplit(".", 1)[-1]
        if len(value) > 253 or not _HOST_NAME.fullmatch(value) or last_label.isdigit():
            raise ValueError(f"{value} is not an IP address, a CIDR network or a host name")
        return value

    @property
    def network(self) -> IpNetwork | None:
        """`host` as addresses; None when it is a host name (resolved at start) or absent."""
        if self.host is None:
            return None
        try:
            return ipaddress.ip_network(self.host)
        except ValueError:
            return None


class ReceiverTls(_Section):
    """DICOM TLS on the listener (PS3.15 Annex B): its own certificate, and whom it trusts."""

    certificate: Path
    private_key: Path
    private_key_password: SecretRef | None = None
    # The CAs whose client certificates are accepted; without it no client certificate is asked.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_trust(self) -> ReceiverTls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate needs ca_certificates, the CAs that issue them"
            )
        return self


class ReceiverSettings(_Section):
    ae_title: AeTitle = "PACS_AGENT"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    # Seconds of network silence after which an association is dropped (PS3.8 9.1.5 ARTIM/idle).
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Seconds a connection may take to complete its association request (PS3.8 9.1.5 ARTIM):
    # a peer that sends half a request holds a slot of max_associations until then.
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Vendors' private storage SOP classes to accept as well (every standard one is accepted);
    # they are stored and listed, never processed. Default: Siemens CSA Non-Image Storage.
    private_sop_classes: tuple[UidStr, ...] = ("1.3.12.2.1107.5.9.1",)
    # Other called AE titles answered besides ae_title (any other is rejected, PS3.8 Table 9-21).
    accepted_called_ae_titles: tuple[AeTitle, ...] = ()
    # With a [receiver.tls] table the port speaks DICOM TLS only (2762 is its registered port).
    tls: ReceiverTls | None = None
    # Largest dataset accepted in one C-STORE; a larger one is refused with 0xA700 and not
    # written; past it, the rest of the dataset is read and dropped, not held in memory.
    max_instance_bytes: Annotated[int, Field(ge=1)] = 2 * 1024**3

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """Every AE title this receiver answers to: its own first, then the aliases."""
        return (self.ae_title, *self.accepted_called_ae_titles)


class WebTls(ReceiverTls):
    """HTTPS on the web port: its certificate and key, and optionally the CAs of client
    certificates (as [receiver.tls]; TLS 1.2 or later)."""


class WebUser(_Section):
    """One HTTP Basic user (RFC 7617): the name, and where its password is kept."""

    # RFC 7617 2: the user-id cannot contain a colon.
    username: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^:\x00-\x1f]+$")]
    password: SecretRef


class WebSettings(_Section):
    """The HTTP port: STOW-RS ingest (/dicom-web), the JSON API (/api) and health."""

    # On by default, on loopback only: the health and status API for this host, and a STOW-RS
    # door that refuses everyone until tokens or users are configured.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # With a [web.tls] table the port speaks HTTPS only.
    tls: WebTls | None = None
    # Bearer tokens accepted (RFC 6750), each from a file or an environment variable.
    tokens: tuple[SecretRef, ...] = ()
    # HTTP Basic users (RFC 7617); use them over TLS only, the password travels in every request.
    users: tuple[WebUser, ...] = ()
    # Requests without credentials are served; with neither tokens nor users nor this, every
    # request but /api/health is refused with 401.
    allow_anonymous: bool = False
    # Largest STOW-RS request body; a larger one is refused with 413. Each instance in it is
    # also held to [receiver] max_instance_bytes. Unset: no limit beyond that one.
    max_request_bytes: Annotated[int, Field(ge=1)] | None = None
    # Connections held open at once. At the limit a new one replaces the oldest connection
    # still waiting for its request headers, or is closed when none is. `serve` lowers it
    # further when the process's file descriptors would not otherwise leave room for the
    # receiver's max_associations.
    max_connections: Annotated[int, Field(ge=1, le=10000)] = 64
    # Seconds a connection may take to send a request's headers (the first one, and each
    # next one on a kept-alive connection); then it is answered 408 and closed.
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # Seconds a request body (a STOW-RS upload) may stop arriving before the connection is
    # closed; an upload cut off stores nothing of its unfinished part.
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("users")
    @classmethod
    def _unique_users(cls, value: tuple[WebUser, ...]) -> tuple[WebUser, ...]:
        names = [user.username for user in value]
        if len(set(names)) != len(names):
            raise ValueError("user names must be unique")
        return value
