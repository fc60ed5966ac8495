"""Deflate bombs: deflated DICOM datasets (PS3.5 A.5) of megabytes that inflate to gigabytes."""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from agent.receive.filemeta import encode_file_meta

GIB = 1024**3
_BLOCK = 1024 * 1024


def _segment(data: bytes) -> bytes:
    """`data` deflated as a self-contained piece of a stream: Z_FULL_FLUSH ends it on a byte
    boundary with an empty window, so pieces made apart join into one valid stream."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=1)
def _zeros_segment() -> bytes:
    return _segment(bytes(_BLOCK))


def deflated_dataset(ds: Dataset, pixel_bytes: int) -> bytes:
    """`ds` (without pixels) then a Pixel Data element of `pixel_bytes` zeros, deflated.

    The zeros are one deflated megabyte repeated: gigabytes are made in milliseconds.
    """
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    element = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", pixel_bytes)
    blocks, rest = divmod(pixel_bytes, _BLOCK)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # the final, empty block
    return b"".join(
        (_segment(head.getvalue() + element), _zeros_segment() * blocks, _segment(bytes(rest)), end)
    )


def bomb_file(path: Path, ds: Dataset, pixel_bytes: int = 2 * GIB) -> Path:
    """Write `ds` as a Part 10 file whose deflated dataset inflates past `pixel_bytes`."""
    meta = encode_file_meta(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian, "BOMB"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(meta + deflated_dataset(ds, pixel_bytes))
    return path


def deflated_file(path: Path, ds: Dataset, pixel_bytes: int) -> Path:
    """As `bomb_file`; the name says what a test means: a deflated instance within the limit."""
    return bomb_file(path, ds, pixel_bytes)
