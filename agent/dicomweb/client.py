"""A DICOMweb client for one configured endpoint: auth, TLS checks, timeouts, no own retries.

dicomweb-client retries on its own by default (429, 408, 503, 504, five attempts); our callers
(the export outbox, the puller, the poller) decide about retries with their own backoff and
ceilings, so that there are never two retry loops on top of each other.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from agent.settings import DicomWebEndpoint
from agent.tls import describe

# PS3.18 and RFC 9110: worth trying again later; any other 4xx will not change by itself.
RETRYABLE_HTTP = frozenset({408, 409, 425, 429})


class _Session(requests.Session):
    """A session with a default timeout on every request (requests has none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)


def session_for(endpoint: DicomWebEndpoint) -> requests.Session:
    """A requests session with the endpoint's credentials, CA checks and timeout."""
    session = _Session(endpoint.timeout_seconds)
    if endpoint.ca_certificates is not None:
        session.verify = str(endpoint.ca_certificates)
    else:
        session.verify = endpoint.verify_tls
    auth = endpoint.auth
    if auth.kind == "basic":
        assert auth.username is not None and auth.password is not None
        session.auth = (auth.username, auth.password.reveal().get_secret_value())
    elif auth.kind == "bearer":
        assert auth.token is not None
        session.headers["Authorization"] = "Bearer " + auth.token.reveal().get_secret_value()
    adapter = HTTPAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def client_for(endpoint: DicomWebEndpoint) -> DICOMwebClient:
    if endpoint.url is None:
        raise ValueError("the DICOMweb endpoint has no url")
    # dicomweb-client passes its own timeout (20 s) with every request, over the session's.
    client = DICOMwebClient(
        url=endpoint.url, session=session_for(endpoint), timeout=endpoint.timeout_seconds
    )
    client.set_http_retry_params(retry=False)
    return client


@dataclass(frozen=True)
class HttpFailure:
    """What an HTTP exchange's failure means: retry or not, why, and when (Retry-After)."""

    retryable: bool
    message: str
    retry_after: float | None = None


def http_failure(exc: Exception, what: str, timeout: float | None = None) -> HttpFailure:
    """Classify a requests exception raised while doing `what` (e.g. "STOW-RS to pacs"),
    saying what happened: "connection refused at pacs:8042", "no answer from pacs:8042 within
    60 s" (`timeout`, the session's), "HTTP 503 Service Unavailable: ...", "TLS error: ...".
    Only the server's address is named, never the request's path or query."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        response = exc.response
        code = response.status_code
        detail = _server_message(response)
        message = f"{what}: HTTP {code} {response.reason or ''}".rstrip() + (
            f": {detail}" if detail else ""
        )
        retryable = code >= 500 or code in RETRYABLE_HTTP
        return HttpFailure(retryable, message, _retry_after(response) if retryable else None)
    where = _server(exc)
    at = f" at {where}" if where else ""
    within = f" within {timeout:g} s" if timeout is not None else ""
    if isinstance(exc, requests.ConnectTimeout):
        return HttpFailure(True, f"{what}: no answer from {where or 'the server'}{within}")
    if isinstance(exc, requests.Timeout):
        return HttpFailure(True, f"{what}: no response from {where or 'the server'}{within}")
    if isinstance(exc, requests.exceptions.SSLError):
        return HttpFailure(True, f"{what}: TLS error{at}: {_tls_reason(exc)}")
    if isinstance(exc, requests.ConnectionError):
        cause = _os_error(exc)
        if isinstance(cause, ConnectionRefusedError):
            return HttpFailure(True, f"{what}: connection refused{at}")
        if isinstance(cause, ConnectionResetError):
            return HttpFailure(True, f"{what}: connection reset by {where or 'the server'}")
        if isinstance(cause, socket.gaierror):
            return HttpFailure(True, f"{what}: cannot resolve the host name of {where}")
        if cause is not None and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return HttpFailure(True, f"{what}: no route to {where or 'the server'}")
        if isinstance(cause, OSError) and cause.strerror:
            return HttpFailure(True, f"{what}: cannot connect{at}: {cause.strerror}")
        return HttpFailure(True, f"{what}: connection failed{at}")
    return HttpFailure(True, f"{what}: {type(exc).__name__}")


def _server(exc: Exception) -> str:
    """host:port of the request that failed, "" when unknown."""
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if not isinstance(url, str):
        return ""
    parts = urlsplit(url)
    if not parts.hostname:
        return ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def _os_error(exc: BaseException) -> OSError | None:
    """The socket error under requests' and urllib3's wrappers (MaxRetryError, ...)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if (
            isinstance(current, OSError)
            and not isinstance(current, requests.RequestException)
            and (current.errno is not None or isinstance(current, socket.gaierror))
        ):
            return current
        nested = [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            nested.append(reason)
        todo += [*nested, *(e for e in (current.__cause__, current.__context__) if e)]
    return None


def _tls_reason(exc: Exception) -> str:
    """The TLS failure in a few words ("certificate verify failed: ...")."""
    cause = _os_error(exc)
    if isinstance(cause, ssl.SSLError):
        return describe(cause)
    return _first_line(exc)


def _server_message(response: requests.Response) -> str:
    text = (response.text or "").strip()
    return " ".join(text.split())[:300]


def _retry_after(response: requests.Response) -> float | None:
    """RFC 9110 10.2.3: seconds, or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
