"""Read the few UIDs the spool needs from an encoded dataset, stopping long before the pixels."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from agent.dicom.files import DICOM_ERRORS
from agent.dicom.uids import is_valid_uid
from agent.errors import PermanentError

_LAST_TAG_NEEDED = 0x0020000E  # Series Instance UID; everything we need sorts before it
_INFLATED_HEAD = 256 * 1024  # of a deflated dataset, enough for the elements before the pixels


class Unreadable(PermanentError):
    """The dataset cannot be parsed in the negotiated transfer syntax."""


@dataclass(frozen=True)
class Identifiers:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    accession_number: str = ""  # "" for none; never logged, kept only as a digest


# SOP Class UID, SOP Instance UID, Study Instance UID, Series Instance UID, Accession Number.
_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00080050)


def _raw_text(ds: Dataset, tag: int) -> str:
    # The raw bytes, not the converted value: conversion would validate (and warn about) a
    # malformed UID that we are about to reject with a precise status anyway.
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("\0 ")


def _stop(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _LAST_TAG_NEEDED)


_PARSE_ERRORS: tuple[type[Exception], ...] = (*DICOM_ERRORS, UserWarning)


def identify(raw: bytes, transfer_syntax: UID) -> Identifiers:
    """Parse SOP Class/Instance, Study and Series UIDs; missing ones come back empty."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # PS3.5 A.5: the whole dataset is a raw deflate stream; only its head is needed.
        try:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, _INFLATED_HEAD)
        except zlib.error as exc:
            raise Unreadable(f"deflate stream is corrupt: {exc}") from exc
    return _parse(BytesIO(raw), transfer_syntax)


def identify_file(fp: BinaryIO, transfer_syntax: UID) -> Identifiers:
    """As `identify`, for a dataset read from `fp` on from its position (a spooled file):
    only the elements before the pixels are read, and no more than the head of a deflated one."""
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        return _parse(fp, transfer_syntax)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    try:
        while len(head) < _INFLATED_HEAD and not inflate.eof:
            chunk = inflate.unconsumed_tail or fp.read(64 * 1024)
            if not chunk:
                break
            head += inflate.decompress(chunk, _INFLATED_HEAD - len(head))
    except zlib.error as exc:
        raise Unreadable(f"deflate stream is corrupt: {exc}") from exc
    return _parse(BytesIO(bytes(head)), transfer_syntax)


def missing_uids(ids: Identifiers) -> list[str]:
    """The identifying UIDs that are absent or malformed, by name (C-STORE status 0xC001)."""
    return [
        name
        for name, value in (
            ("SOPInstanceUID", ids.sop_uid),
            ("StudyInstanceUID", ids.study_uid),
            ("SeriesInstanceUID", ids.series_uid),
        )
        if not is_valid_uid(value)
    ]


def _parse(fp: BinaryIO, transfer_syntax: UID) -> Identifiers:
    try:
        ds = read_dataset(
            fp,
            is_implicit_VR=transfer_syntax.is_implicit_VR,
            is_little_endian=transfer_syntax.is_little_endian,
            stop_when=_stop,
        )
        values = [_raw_text(ds, tag) for tag in _TAGS]
    # pydicom warns, not raises, when a dataset ends inside an element (a lying length) and
    # returns what it read; where warnings are errors, that warning is the failure.
    except _PARSE_ERRORS as exc:
        raise Unreadable(f"dataset cannot be parsed: {type(exc).__name__}") from exc
    return Identifiers(*values)
