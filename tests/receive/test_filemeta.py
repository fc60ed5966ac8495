"""The hand-encoded File Meta Information group matches pydicom's encoder byte for byte."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless, generate_uid

from agent.receive.filemeta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    encode_file_meta,
)


@pytest.mark.parametrize("ae_title", ["STORESCU", "CT1", "A"])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", generate_uid()])
def test_same_bytes_as_pydicom(sop_uid: str, ae_title: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEG2000Lossless
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = ae_title
    expected = DicomBytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)

    ours = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", sop_uid, JPEG2000Lossless, ae_title + "  ")
    assert ours == expected.getvalue()
    read = pydicom.dcmread(BytesIO(ours + b"\x08\x00\x60\x00CS\x02\x00CT"))
    assert read.file_meta.MediaStorageSOPInstanceUID == sop_uid
    assert read.file_meta.SourceApplicationEntityTitle == ae_title
    assert read.Modality == "CT"
