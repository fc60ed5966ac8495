"""Bounded inflation of a deflated dataset (PS3.5 A.5): never more than a limit, never all at once.

A deflated dataset of a megabyte can inflate to gigabytes (a deflate bomb: long runs of one
byte compress a thousandfold). pydicom inflates the whole stream in memory before it reads a
single element, so every read of such a file here goes through `Inflated`, which inflates on
demand, in chunks, and refuses once the inflated size passes the limit.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import BinaryIO

from agent.errors import PermanentError

CHUNK_BYTES = 64 * 1024


class InflatedTooLarge(PermanentError):
    """The inflated dataset is larger than the instance size limit."""

    def __init__(self, limit: int, message: str = "") -> None:
        super().__init__(message or f"inflated dataset over the {limit}-byte limit")
        self.limit = limit


class CorruptDeflate(PermanentError):
    """The deflate stream cannot be inflated."""


def inflated_chunks(fp: BinaryIO, limit: int) -> Iterator[bytes]:
    """The dataset deflated in `fp` (from its position on), inflated chunk by chunk.

    Raises InflatedTooLarge as soon as more than `limit` bytes came out, CorruptDeflate for a
    damaged stream. Bytes after the end of the deflate stream are ignored.
    """
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflate.eof:
            data = inflate.unconsumed_tail or fp.read(CHUNK_BYTES)
            # max_length: zlib stops at a chunk of output, keeping the rest of the input.
            out = inflate.decompress(data, CHUNK_BYTES) if data else inflate.flush()
            total += len(out)
            if total > limit:
                raise InflatedTooLarge(limit)
            if out:
                yield out
            if not data:
                break
    except zlib.error as exc:
        raise CorruptDeflate(f"deflate stream is corrupt: {exc}") from exc


def check_inflated_size(fp: BinaryIO, limit: int) -> int:
    """The inflated size of the dataset deflated in `fp`; InflatedTooLarge past `limit`.

    Nothing is kept: memory stays at one chunk whatever the stream inflates to.
    """
    return sum(len(chunk) for chunk in inflated_chunks(fp, limit))


class Inflated:
    """A read-only, seekable file over a deflated dataset, inflated only as far as it is read.

    What was inflated is kept (a parser seeks back a few bytes at times), so a reader that
    stops before the pixel data holds only the elements before them. `drain` reads the rest
    without keeping it, to learn whether the whole dataset is within the limit.
    """

    def __init__(self, fp: BinaryIO, limit: int, name: str = "") -> None:
        self._chunks = inflated_chunks(fp, limit)
        self._data = bytearray()
        self._pos = 0
        self._ended = False
        self.name = name

    def _fill(self, end: int | None) -> None:
        while not self._ended and (end is None or len(self._data) < end):
            chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
            else:
                self._data += chunk

    def read(self, size: int | None = -1) -> bytes:
        end = None if size is None or size < 0 else self._pos + size
        self._fill(end)
        data = bytes(self._data[self._pos : end])
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(None)
            offset += len(self._data)
        elif whence == 1:
            offset += self._pos
        self._pos = max(offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def drain(self) -> None:
        """Inflate what is left, keeping none of it (InflatedTooLarge past the limit)."""
        for _chunk in self._chunks:
            pass
        self._ended = True
