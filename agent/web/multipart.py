"""A streaming reader of multipart bodies (RFC 2046 5.1.1): parts' bytes as they arrive, unbuffered.

Sans-IO: `feed` takes the body's chunks in order and returns what they completed; the caller
decides where the bytes go (a file), so a part of any size costs a few chunks of memory. The
boundary is searched with `bytes.find`, which runs at memory speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

# RFC 2046 5.1.1: a boundary is 1 to 70 characters from this set (and does not end in a space).
_BOUNDARY_CHARS = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
)
MAX_HEADER_BYTES = 16 * 1024  # of one part's header section
_MAX_PADDING = 256  # transport padding (spaces, tabs) after a delimiter


class MultipartError(ValueError):
    """The body is not a well-formed multipart body: it says where it went wrong."""


class BodyCutOff(MultipartError):
    """The body ended after a part began but before its closing delimiter: it was cut off on
    its way (a proxy, a sender that stopped), not built wrong."""


@dataclass(frozen=True)
class MediaType:
    """A Content-Type value: the type/subtype in lower case and its parameters."""

    type: str
    params: dict[str, str]

    @classmethod
    def parse(cls, value: str) -> MediaType:
        message = Message()
        message["content-type"] = value
        # email's parser knows quoting and continuations (RFC 2045 5.1); names come lower-cased.
        params = {
            str(name).lower(): str(message.get_param(name, ""))
            for name, _ in (message.get_params() or [])[1:]
        }
        kind = value.split(";", 1)[0].strip().lower()
        return cls(kind, params)


def boundary_of(media_type: MediaType) -> bytes:
    """The boundary parameter, checked against RFC 2046 5.1.1; MultipartError if unusable."""
    boundary = media_type.params.get("boundary", "")
    raw = boundary.encode("ascii", "replace")
    if not 1 <= len(raw) <= 70 or not set(raw) <= _BOUNDARY_CHARS or raw.endswith(b" "):
        raise MultipartError("the Content-Type has no valid boundary parameter")
    return raw


@dataclass(frozen=True)
class PartStart:
    """A part begins; `headers` with lower-cased names."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)


class MultipartReader:
    """Reads one multipart body; `feed` each chunk, then `close` at its end."""

    def __init__(self, boundary: bytes) -> None:
        # Every delimiter is CRLF "--" boundary (RFC 2046 5.1.1); the first may open the body
        # without the CRLF, so the body is read as if one came before it.
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self.parts = 0

    @property
    def complete(self) -> bool:
        """The closing delimiter has been read."""
        return self._state == _EPILOGUE

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state == _EPILOGUE:
            return []  # RFC 2046: the epilogue is to be ignored
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """The body has ended; MultipartError unless it ended after its closing delimiter."""
        if self._state == _PREAMBLE:
            raise MultipartError("the body ends before its first boundary")
        if self._state != _EPILOGUE:
            raise BodyCutOff("the body ends before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Consume what the buffer allows in the current state; False when more is needed."""
        buffer = self._buffer
        if self._state in (_PREAMBLE, _BODY):
            at = buffer.find(self._delimiter)
            if at < 0:
                # Keep what could be the start of a delimiter split across chunks.
                keep = len(self._delimiter) - 1
                if self._state == _BODY and len(buffer) > keep:
                    with memoryview(buffer) as view:
                        events.append(PartData(bytes(view[:-keep])))
                if len(buffer) > keep:
                    del buffer[:-keep]
                return False
            if self._state == _BODY:
                if at:
                    with memoryview(buffer) as view:
                        events.append(PartData(bytes(view[:at])))
                events.append(PartEnd())
            del buffer[: at + len(self._delimiter)]
            self._state = _DELIMITER
            return True
        if self._state == _DELIMITER:
            if buffer[:2] == b"--":
                self._state = _EPILOGUE
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                # Wait while what came may still become "--" or padding and its CRLF.
                pending = bytes(buffer)
                if pending == b"-" or (
                    len(pending) <= _MAX_PADDING and not pending.rstrip(b"\r").strip(b" \t")
                ):
                    return False
                raise MultipartError("a boundary line has more than the boundary")
            if buffer[:end].strip(b" \t"):
                raise MultipartError("a boundary line has more than the boundary")
            del buffer[: end + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            if buffer[:2] == b"\r\n":  # no header fields at all
                del buffer[:2]
                self._begin({}, events)
                return True
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("a part's headers are too long")
                return False
            headers = _parse_headers(bytes(buffer[:end]))
            del buffer[: end + 4]
            self._begin(headers, events)
            return True
        return False

    def _begin(self, headers: dict[str, str], events: list[Event]) -> None:
        self.parts += 1
        self._state = _BODY
        events.append(PartStart(headers))


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = ""
    for line in block.decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and name:  # obsolete line folding (RFC 5322 2.2.3)
            headers[name] += " " + line.strip()
            continue
        field, colon, value = line.partition(":")
        if not colon or not field.strip():
            raise MultipartError("a part has a malformed header line")
        name = field.strip().lower()
        headers[name] = value.strip()
    return headers
