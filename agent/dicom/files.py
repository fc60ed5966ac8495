"""Reading DICOM files from the spool, with pydicom's many failure types mapped to one error."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from agent.errors import PermanentError


def read_dicom(path: Path, *, pixels: bool = False) -> Dataset:
    """Read a DICOM file (without its pixel data unless asked); PermanentError if unreadable.

    The message names the file (its SOP Instance UID) and the error type, never a value.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise PermanentError(f"cannot read {path.name}: {type(exc).__name__}") from exc


def read_header(path: Path) -> Dataset:
    """Read a DICOM file without its pixel data; PermanentError if it cannot be parsed."""
    return read_dicom(path)
