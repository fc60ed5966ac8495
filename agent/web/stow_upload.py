"""A STOW-RS request body streamed part by part into the spool's tmp folder, each part checked.

Each part goes to a temp file as it arrives, never held in memory, and is handed to the check
(in a worker thread) as soon as it ends, while the next ones are read. What is left in tmp when
the request is over, whether it failed or its parts were refused, is removed by `discard`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from agent.receive.handlers import OUT_OF_RESOURCES
from agent.spool.watermark import Watermark
from agent.web.body import drain
from agent.web.multipart import MultipartReader, PartData, PartEnd, PartStart
from agent.web.stow_response import Result

log = logging.getLogger(__name__)

_HEAD_BYTES = 1024 * 1024  # kept of a part that is refused anyway, to name it in the answer
_CHECKS_IN_FLIGHT = 4  # parts checked and synced in threads while the next ones arrive


@dataclass
class Part:
    """A part being written to its temp file."""

    path: Path
    fd: int | None
    refusal: tuple[int, str] | None = None
    size: int = 0
    kept: int = 0

    def close(self) -> None:
        """Close the temp file, once; it stays on disk."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class RequestTooLarge(Exception):
    """The body went on past the request size limit."""


@dataclass
class Body:
    """The request body as chunks, remembering whether it was read to its end."""

    request: Request
    ended: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.ended = not message.get("more_body", False)
            body = message.get("body", b"")
            if body:
                yield body

    async def drain(self) -> None:
        if not self.ended:
            await drain(self.request.receive)


@dataclass
class Upload:
    """One request's parts: streamed to temp files in `tmp`, checked in threads as each one ends.

    A part arriving while the `watermark` is low, or growing past `max_instance_bytes`, is
    marked refused, and only its head is kept, for `check` to name it in the answer.
    """

    tmp: Path
    check: Callable[[Part], Result]
    watermark: Watermark | None = None
    max_instance_bytes: int | None = None
    max_request_bytes: int | None = None
    parts: list[Part] = field(default_factory=list)
    checks: list[asyncio.Future[Result]] = field(default_factory=list)

    async def receive(self, body: Body, boundary: bytes) -> list[Result]:
        """Every part's check, in order; raises on a malformed, too large or broken-off body."""
        reader = MultipartReader(boundary)
        received = 0
        async for chunk in body.chunks():
            received += len(chunk)
            if self.max_request_bytes is not None and received > self.max_request_bytes:
                raise RequestTooLarge()
            for event in reader.feed(chunk):
                if isinstance(event, PartData):
                    self._write(event.data)
                elif isinstance(event, PartStart):
                    self._begin()
                elif isinstance(event, PartEnd):
                    await self._end()
        reader.close()
        return [await check for check in self.checks]

    def _begin(self) -> None:
        path = self.tmp / f"stow-{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        part = Part(path, fd)
        if self.watermark is not None:
            level = self.watermark.check()
            if level.low:
                part.refusal = (OUT_OF_RESOURCES, level.reason)
        self.parts.append(part)

    def _write(self, data: bytes) -> None:
        part = self.parts[-1]
        part.size += len(data)
        limit = self.max_instance_bytes
        if part.refusal is None and limit is not None and part.size > limit:
            log.warning("refused an uploaded instance over the limit of %d bytes", limit)
            part.refusal = (OUT_OF_RESOURCES, f"instance over the {limit}-byte limit")
        # Past the limit, or once refused, only the head is kept: enough to name the instance.
        room = (_HEAD_BYTES if part.refusal is not None else part.size) - part.kept
        view = memoryview(data)[: max(room, 0)]
        try:
            while view and part.fd is not None:
                written = os.write(part.fd, view)
                view = view[written:]
                part.kept += written
        except OSError as exc:
            if part.refusal is None:
                log.error("spool write failed: %s", exc.strerror)
                part.refusal = (OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")

    async def _end(self) -> None:
        part = self.parts[-1]
        self.checks.append(asyncio.ensure_future(run_in_threadpool(self.check, part)))
        # The next part is read while this one is checked and synced; a few at most.
        unfinished = [check for check in self.checks if not check.done()]
        if len(unfinished) >= _CHECKS_IN_FLIGHT:
            await unfinished[0]

    def checked(self) -> list[Result]:
        """The parts checked so far, in order (after `discard`: every part that ended)."""
        return [
            check.result()
            for check in self.checks
            if check.done() and not check.cancelled() and check.exception() is None
        ]

    async def discard(self) -> None:
        """Remove what is left in tmp: the parts of a failed request, or refused ones."""
        if self.checks:
            await asyncio.gather(*self.checks, return_exceptions=True)
        for part in self.parts:
            part.close()
            part.path.unlink(missing_ok=True)
