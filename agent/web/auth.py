"""Who may use the web port: bearer tokens (RFC 6750), Basic users (RFC 7617), or anyone.

Every path but the public ones (health) needs credentials unless anonymous use is allowed;
credentials that are given and wrong are refused even then. Secrets are read once, when the
port opens, and compared in constant time; neither they nor a rejected value are ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from agent import audit
from agent.settings import WebSettings
from agent.web.body import drain

log = logging.getLogger(__name__)

REALM = "pacs-agent"


@dataclass(frozen=True)
class Principal:
    """Who a request was admitted as: "token 2", "user alice" or "anonymous"; never a secret."""

    name: str


ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class Authenticator:
    """Checks an Authorization header against the configured tokens and users."""

    tokens: Sequence[SecretStr] = ()
    users: dict[str, SecretStr] = field(default_factory=dict)
    allow_anonymous: bool = False

    @classmethod
    def from_settings(cls, web: WebSettings) -> Authenticator:
        """Read the secrets now; a ConfigError names where one could not be read."""
        return cls(
            tokens=tuple(ref.reveal() for ref in web.tokens),
            users={user.username: user.password.reveal() for user in web.users},
            allow_anonymous=web.allow_anonymous,
        )

    @property
    def configured(self) -> bool:
        """Whether anyone at all can be admitted."""
        return bool(self.tokens or self.users or self.allow_anonymous)

    def challenges(self) -> list[str]:
        """WWW-Authenticate values for a 401 (RFC 9110 11.6.1: at least one)."""
        found = []
        if self.tokens or not self.users:
            found.append(f'Bearer realm="{REALM}"')
        if self.users:
            found.append(f'Basic realm="{REALM}", charset="UTF-8"')
        return found

    def authenticate(self, authorization: str | None) -> Principal | str:
        """The principal admitted, or why the request is refused (no secret in it)."""
        if not authorization:
            if self.allow_anonymous:
                return ANONYMOUS
            return "no credentials"
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            return self._bearer(credentials)
        if scheme.lower() == "basic":
            return self._basic(credentials)
        return f"unsupported authorization scheme {scheme[:20]!r}"

    def _bearer(self, token: str) -> Principal | str:
        given = token.encode("utf-8", "replace")
        match = None
        # Every token is compared, so the time taken does not say which one nearly matched.
        for number, expected in enumerate(self.tokens, start=1):
            if hmac.compare_digest(given, expected.get_secret_value().encode()) and match is None:
                match = Principal(f"token {number}")
        return match or "wrong bearer token"

    def _basic(self, credentials: str) -> Principal | str:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "malformed basic credentials"
        username, colon, password = decoded.partition(":")
        if not colon:
            return "malformed basic credentials"
        match = None
        for name, expected in self.users.items():
            same_name = hmac.compare_digest(username.encode(), name.encode())
            same_password = hmac.compare_digest(
                password.encode(), expected.get_secret_value().encode()
            )
            if same_name and same_password and match is None:
                match = Principal(f"user {name}")
        # The name a caller tried is not logged either: people type passwords into it.
        return match or "wrong user name or password"


class RequireAuth:
    """ASGI middleware: a request to a path outside `public` needs admitted credentials.

    The principal goes into the request's scope (`scope["principal"]`). A refusal is a 401
    with the challenges, logged and written to the audit trail as a failed login.
    """

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator, public: Collection[str] = ()
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        outcome = self.authenticator.authenticate(header)
        if isinstance(outcome, Principal):
            scope["principal"] = outcome
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or (None, None)
        log.warning(
            "web: refused %s %s from %s: %s", scope["method"], _path(scope), client[0], outcome
        )
        audit.login_refused(audit.Peer(address=client[0], port=client[1]), outcome)
        body = json.dumps({"error": "authentication required"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(b"www-authenticate", c.encode()) for c in self.authenticator.challenges()]
        await drain(receive)  # so that an uploader sees this answer, not a reset
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _path(scope: Scope) -> str:
    """The path for a log line, with a study UID in it replaced: logs carry no UIDs."""
    path = str(scope.get("path", ""))
    head, marker, _rest = path.partition("/studies/")
    return head + marker + "..." if marker else path
