"""The streaming multipart reader: any chunking gives the same parts; malformed bodies fail."""

from __future__ import annotations

import random

import pytest

from agent.web.multipart import (
    MediaType,
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)

BOUNDARY = b"xyzBOUNDARY"


def _body(parts: list[bytes]) -> bytes:
    encoded = b"".join(
        b"--" + BOUNDARY + b"  \r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return b"a preamble\r\n" + encoded + b"--" + BOUNDARY + b"--\r\nan epilogue"


def _read(body: bytes, size: int) -> list[tuple[dict[str, str], bytes]]:
    reader = MultipartReader(BOUNDARY)
    parts: list[tuple[dict[str, str], bytes]] = []
    current = bytearray()
    headers: dict[str, str] = {}
    for start in range(0, len(body), size):
        for event in reader.feed(body[start : start + size]):
            if isinstance(event, PartStart):
                headers, current = event.headers, bytearray()
            elif isinstance(event, PartData):
                current += event.data
            else:
                assert isinstance(event, PartEnd)
                parts.append((headers, bytes(current)))
    reader.close()
    return parts


@pytest.mark.parametrize("size", [1, 2, 3, 13, 4096, 1 << 20])
def test_any_chunking_gives_the_same_parts(size: int) -> None:
    parts = [b"near miss: \r\n--xyzBOUNDAR", b"", random.Random(1).randbytes(50_000)]
    read = _read(_body(parts), size)
    assert [data for _headers, data in read] == parts
    assert all(headers == {"content-type": "application/dicom"} for headers, _data in read)


@pytest.mark.parametrize(
    "body",
    [
        _body([b"x" * 100])[:80],  # ends inside a part
        _body([b"x"]).replace(b"--\r\nan epilogue", b""),  # no closing delimiter
        b"--" + BOUNDARY + b"junk\r\n\r\n",  # the boundary line has more after it
        b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY + b"--",
    ],
)
def test_malformed_bodies_fail(body: bytes) -> None:
    reader = MultipartReader(BOUNDARY)
    with pytest.raises(MultipartError):
        reader.feed(body)
        reader.close()


def test_media_type_and_boundary() -> None:
    media = MediaType.parse('Multipart/Related; type="application/dicom"; boundary="a b:c"')
    assert media.type == "multipart/related"
    assert media.params["type"] == "application/dicom"
    assert boundary_of(media) == b"a b:c"
    with pytest.raises(MultipartError):
        boundary_of(MediaType.parse("multipart/related; boundary=" + "x" * 71))
