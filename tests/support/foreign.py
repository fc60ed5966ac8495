"""Objects a real study carries besides its image series: SR, PDF, presentation state, KOS, RT,
a private SOP class, and a localizer; each written into a given study, small and valid enough."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    RTStructureSetStorage,
    generate_uid,
)

from tests.support.phantom import ct_file_meta, ct_slice_header, set_patient_and_study

# A vendor's private non-image SOP class (Siemens CSA Non-Image Storage), as sent by scanners.
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"


def _base(study_uid: str, sop_class: str, modality: str, series_number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    set_patient_and_study(ds, study_uid)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = "elsewhere"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    return ds


def _save(ds: Dataset, folder: Path, name: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_text_sr(folder: Path, study_uid: str) -> Path:
    """A Basic Text SR from another system (a dictated report), series 90."""
    ds = _base(study_uid, BasicTextSRStorage, "SR", 90)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "11528-7", "LN"
    title.CodeMeaning = "Radiology Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue, finding.CodingSchemeDesignator = "121071", "DCM"
    finding.CodeMeaning = "Finding"
    item.ConceptNameCodeSequence = Sequence([finding])
    item.TextValue = "No acute findings."
    ds.ContentSequence = Sequence([item])
    return _save(ds, folder, "report-sr")


def write_pdf(folder: Path, study_uid: str) -> Path:
    """An Encapsulated PDF (a scanned request form), series 91."""
    ds = _base(study_uid, EncapsulatedPDFStorage, "DOC", 91)
    ds.ConversionType = "SD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Request form"
    ds.ConceptNameCodeSequence = Sequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.AcquisitionDateTime = "20240101120000"
    return _save(ds, folder, "request-pdf")


def write_presentation_state(folder: Path, study_uid: str) -> Path:
    """A Grayscale Softcopy Presentation State (a saved window/level), series 92."""
    ds = _base(study_uid, GrayscaleSoftcopyPresentationStateStorage, "PR", 92)
    ds.ContentLabel = "SAVED"
    ds.PresentationCreationDate = "20240101"
    ds.PresentationCreationTime = "120000"
    return _save(ds, folder, "window-pr")


def write_key_objects(folder: Path, study_uid: str) -> Path:
    """A Key Object Selection document, series 93."""
    ds = _base(study_uid, KeyObjectSelectionDocumentStorage, "KO", 93)
    ds.ValueType = "CONTAINER"
    return _save(ds, folder, "key-ko")


def write_rt_structure_set(folder: Path, study_uid: str) -> Path:
    """An RT Structure Set header, series 94."""
    ds = _base(study_uid, RTStructureSetStorage, "RTSTRUCT", 94)
    ds.StructureSetLabel = "PLAN"
    return _save(ds, folder, "plan-rtstruct")


def write_private_object(folder: Path, study_uid: str) -> Path:
    """An instance of a vendor's private non-image SOP class, series 95."""
    ds = _base(study_uid, PRIVATE_SOP_CLASS, "CT", 95)
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291010, "OB", b"\x01\x02\x03\x04")
    return _save(ds, folder, "private-csa")


def write_localizer(folder: Path, study_uid: str, series_number: int = 100) -> Path:
    """A single coronal CT topogram (ImageType ...\\LOCALIZER), as scanners send first."""
    series_uid, frame_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    ds = ct_slice_header(study_uid, series_uid, frame_uid, sop_uid, series_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram 0.6 T20f"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.ImagePositionPatient = [-250.0, 0.0, 300.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = np.full((64, 64), 1024, dtype=np.uint16).tobytes()
    ds.file_meta = ct_file_meta(sop_uid, ExplicitVRLittleEndian)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "localizer.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert ds.SOPClassUID == CTImageStorage
    return path


FOREIGN_WRITERS = (
    write_text_sr,
    write_pdf,
    write_presentation_state,
    write_key_objects,
    write_rt_structure_set,
    write_private_object,
)
