"""Tell whether two frames hold the same stored pixel values, decoding only when encodings differ.

Two frames at one slice position are one image received twice only if their pixels match; the
headers alone cannot tell a copy from a second acquisition (see geometry.gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.encaps import get_frame
from pydicom.uid import UID, ImplicitVRLittleEndian

from agent.dicom.files import DICOM_ERRORS, read_dicom
from agent.errors import PermanentError
from agent.inference.decode import DecodeItem, stored_frame
from agent.inference.frames import Frame
from agent.logs import instance_key


def _number_of_frames(value: Any) -> int:
    """NumberOfFrames as an int; 1 where it is absent, zero or not a number."""
    try:
        count = None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        count = None
    return count or 1


def _pixel_bytes(path: Path, index: int) -> tuple[UID, bytes]:
    """The transfer syntax and the still-encoded bytes of one frame of a file."""
    ds = read_dicom(path, pixels=True)
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(getattr(meta, "TransferSyntaxUID", "") or ImplicitVRLittleEndian))
    data = ds.get("PixelData")
    if not isinstance(data, bytes):
        raise PermanentError(f"{instance_key(path)} has no PixelData")
    count = _number_of_frames(ds.get("NumberOfFrames"))
    if index >= count:
        raise PermanentError(f"{instance_key(path)} has no frame {index + 1}")
    if syntax.is_encapsulated:
        try:
            return syntax, get_frame(data, index, number_of_frames=count)
        except DICOM_ERRORS as exc:  # malformed encapsulation
            raise PermanentError(
                f"cannot find frame {index + 1} in {instance_key(path)}: {type(exc).__name__}"
            ) from exc
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    size = size * int(ds.BitsAllocated) // 8
    return syntax, data[index * size : (index + 1) * size]


def _decoded(frame: Frame) -> np.ndarray:
    # The loader's own decoding (its plugin choice, deflate, sign extension), without rescale.
    return stored_frame(DecodeItem(frame.path, frame.index, 1.0, 0.0))


def same_pixels(a: Frame, b: Frame) -> bool:
    """Whether two frames hold the same stored pixel values.

    The encoded bytes are compared first; frames are decoded only when one of them is
    compressed and the bytes differ, since two encoders may compress one image differently.
    PermanentError if a file cannot be read or decoded.
    """
    if a.shape != b.shape:
        return False
    syntax_a, bytes_a = _pixel_bytes(a.path, a.index)
    syntax_b, bytes_b = _pixel_bytes(b.path, b.index)
    if syntax_a == syntax_b and bytes_a == bytes_b:
        return True
    if syntax_a == syntax_b and not syntax_a.is_compressed:
        return False
    return bool(np.array_equal(_decoded(a), _decoded(b)))
