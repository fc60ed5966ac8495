"""The agent's web port in this process on a loopback port, and STOW-RS request bodies."""

from __future__ import annotations

import io
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import requests
from pydicom.dataset import Dataset

from agent.db.database import Database
from agent.db.values import ArrivedInstance, SenderNews
from agent.settings import SecretRef, Settings, SpoolSettings, WebSettings
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.web.app import WebServices
from agent.web.server import WebServer, start_web

TOKEN = "s3cret-token-for-tests"
CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary={boundary}'
CUT_OFF_WAIT_SECONDS = 30.0  # how long `send_cut_off` waits for the server to read; not asserted


def secret_file(folder: Path, name: str, value: str) -> SecretRef:
    """A SecretRef to a file holding `value`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(value + "\n")
    return SecretRef(file=path)


def web_settings(folder: Path, **fields: Any) -> WebSettings:
    """[web] on 127.0.0.1, a port the system picks, the test token accepted; `fields` on top."""
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "tokens": (secret_file(folder / "secrets", "token", TOKEN),),
    }
    return WebSettings(**{**defaults, **fields})


class WebAgent:
    """A started web port spooling under `root`, with what it spooled and announced.

    What it announces goes to `sink` where one is given (an assembler), else it is kept:
    instances in `arrivals`, how each request went for each study in `news`. As a context
    manager it stops the server on exit.
    """

    def __init__(
        self,
        root: Path,
        web: WebSettings,
        watermark: Watermark | None = None,
        sink: Callable[[SenderNews], None] | None = None,
        **settings: Any,
    ) -> None:
        self.settings = Settings(spool=SpoolSettings(path=root / "spool"), web=web, **settings)
        self.layout = SpoolLayout(self.settings.spool.path)
        self.layout.create()
        self.db = Database(f"sqlite:///{root / 'agent.db'}")
        self.db.create_schema()
        self.arrivals: list[ArrivedInstance] = []
        # Interruption or CleanSend, per study of each request.
        self.news: list[SenderNews] = []
        services = WebServices(self.settings, self.layout, self.db, sink or self._keep, watermark)
        self.server: WebServer = start_web(services)
        self.url = self.server.url

    def _keep(self, news: SenderNews) -> None:
        (self.arrivals if isinstance(news, ArrivedInstance) else self.news).append(news)

    def spooled(self) -> list[Path]:
        return sorted(self.layout.studies.glob("*/*/*.dcm"))

    def leftovers(self) -> list[Path]:
        """Files left in the spool's tmp folder."""
        return sorted(self.layout.tmp.iterdir())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.stop()
        self.db.dispose()


def session(token: str | None = TOKEN, verify: bool | str = True) -> requests.Session:
    """A requests session that never uses a proxy, with a bearer token unless None."""
    s = requests.Session()
    s.trust_env = False
    s.verify = verify
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def part10(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file's bytes."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(parts: Iterable[bytes], boundary: str) -> bytes:
    """A multipart/related body of application/dicom parts."""
    return b"".join(multipart_chunks(([p] for p in parts), boundary))


def multipart_chunks(parts: Iterable[Iterable[bytes]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body as chunks, each part given as its own chunks."""
    for chunks in parts:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def new_boundary() -> str:
    return uuid.uuid4().hex


def post_head(boundary: str, length: int, path: str = "/dicom-web/studies") -> bytes:
    """The head of a STOW-RS request with the test token, for a body of `length` bytes."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {CONTENT_TYPE.format(boundary=boundary)}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def send_cut_off(port: int, tmp: Path, parts: list[bytes], complete: int) -> None:
    """Send a STOW-RS request whose body holds `parts`, and leave once `complete` of them have
    reached the server whole and the next has begun: a client gone mid-body. `tmp` is the
    spool's tmp folder, where the server writes each part as it comes."""
    boundary = new_boundary()
    body = multipart(parts, boundary)
    delimiter = f"\r\n--{boundary}".encode()
    at = 0
    for _ in range(complete):  # the body opens with a delimiter without its CRLF
        at = body.index(delimiter, at + 1)
    end = at + len(delimiter) + 200  # into the next part's bytes
    with socket.create_connection(("127.0.0.1", port), CUT_OFF_WAIT_SECONDS) as sock:
        sock.sendall(post_head(boundary, len(body)) + body[:end])
        # The server has read the parts when the next one's temp file is there; only then
        # leave, or the server may see the client gone before it reads what was sent.
        deadline = time.monotonic() + CUT_OFF_WAIT_SECONDS
        while len(list(tmp.iterdir())) <= complete:
            assert time.monotonic() < deadline, "the server did not read the parts sent"
            time.sleep(0.02)
