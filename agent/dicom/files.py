"""Reading DICOM files from the spool, with pydicom's many failure types mapped to one error."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from agent.errors import PermanentError
from agent.logs import instance_key

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


def read_dicom(path: Path, *, pixels: bool = False) -> Dataset:
    """Read a DICOM file (without its pixel data unless asked); PermanentError if unreadable.

    The message names the file by a hash of its name (a spooled file's name is its SOP
    Instance UID) and the error type, never a value.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except DICOM_ERRORS as exc:
        raise PermanentError(f"cannot read {instance_key(path)}: {type(exc).__name__}") from exc


def read_header(path: Path) -> Dataset:
    """Read a DICOM file without its pixel data; PermanentError if it cannot be parsed."""
    return read_dicom(path)
