"""Reading DICOM files from the spool, with pydicom's many failure types mapped to one error."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from agent.dicom.inflate import Inflated, InflatedTooLarge
from agent.errors import PermanentError
from agent.logs import instance_key

# A reader that is given no limit holds a deflated dataset to the receiver's default
# [receiver] max_instance_bytes; the callers that have the settings pass the configured one.
DEFAULT_MAX_BYTES = 2 * 1024**3
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))  # Float, Double Float, Pixel Data

# What pydicom and its pixel-data plugins raise for a damaged, truncated or unsupported file.
# They share no base class: parsing raises InvalidDicomError, ValueError (UnicodeDecodeError
# among them), KeyError, IndexError, TypeError, AttributeError, NotImplementedError (unknown
# VR), EOFError, struct.error and OverflowError (lying lengths) and OSError; the codecs
# (pylibjpeg, CharLS, GDCM) raise RuntimeError or ValueError.
DICOM_ERRORS: tuple[type[Exception], ...] = (
    InvalidDicomError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    NotImplementedError,
    EOFError,
    OSError,
    OverflowError,
    RuntimeError,
    struct.error,
)


def read_dicom(path: Path, *, pixels: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    """Read a DICOM file (without its pixel data unless asked); PermanentError if unreadable.

    A deflated dataset (PS3.5 A.5) is inflated only as far as it is read, and refused with
    InflatedTooLarge once it inflates past `max_bytes`: the whole stream is inflated (and
    counted, not kept) even for a header, so that a file is refused the same way by every
    reader. The message names the file by a hash of its name (a spooled file's name is its SOP
    Instance UID) and the error, never a value.
    """
    try:
        with path.open("rb") as fp:
            preamble = read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                fp.seek(0)
                return pydicom.dcmread(fp, stop_before_pixels=not pixels)
            return _read_deflated(fp, path, preamble, meta, pixels, max_bytes)
    except InflatedTooLarge as exc:
        raise InflatedTooLarge(exc.limit, f"cannot read {instance_key(path)}: {exc}") from exc
    except PermanentError as exc:
        raise PermanentError(f"cannot read {instance_key(path)}: {exc}") from exc
    except DICOM_ERRORS as exc:
        raise PermanentError(f"cannot read {instance_key(path)}: {type(exc).__name__}") from exc


def _stop_at_pixels(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _read_deflated(
    fp: BinaryIO,
    path: Path,
    preamble: bytes | None,
    meta: pydicom.dataset.FileMetaDataset,
    pixels: bool,
    max_bytes: int,
) -> Dataset:
    inflated = Inflated(fp, max_bytes, name=str(path))
    body = cast(BinaryIO, inflated)
    ds = read_dataset(
        body,
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=None if pixels else _stop_at_pixels,
    )
    inflated.drain()
    return FileDataset(
        str(path),
        ds,
        preamble=preamble,
        file_meta=meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )


def read_header(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    """Read a DICOM file without its pixel data; PermanentError if it cannot be parsed."""
    return read_dicom(path, max_bytes=max_bytes)
