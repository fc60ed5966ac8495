"""A synthetic CT series of an anatomical phantom with exactly known tissue volumes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Tissue labels of the phantom's own label map.
AIR, FAT, SOFT, LUNG, BONE, GAS = range(6)
HU = {AIR: -1000.0, FAT: -100.0, SOFT: 40.0, LUNG: -850.0, BONE: 700.0, GAS: -1000.0}
NOISE_HU = 12.0  # Gaussian noise, far below the gaps between the tissue thresholds

# Segment label (as ct-tissue names them) -> phantom labels it covers.
SEGMENT_LABELS: Mapping[str, tuple[int, ...]] = {
    "Body": (FAT, SOFT, LUNG, BONE, GAS),
    "Lungs": (LUNG,),
    "Bone": (BONE,),
    "Adipose tissue": (FAT,),
    "Soft tissue": (SOFT,),
}


@dataclass(frozen=True)
class PhantomTruth:
    """What was written and the true volume (ml) of each ct-tissue segment, by segment label."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]  # in slice order (ascending z)
    files: tuple[Path, ...]  # same order
    volumes_ml: Mapping[str, float]


def phantom_labels(
    slices: int, rows: int, cols: int, pixel_spacing: float, slice_spacing: float
) -> np.ndarray:
    """The phantom's label map, (z, y, x) with z ascending toward the head.

    Sizes are in mm, so the anatomy stays the same at any grid; it needs a field of view of at
    least 350 mm. Every structure is many voxels thick so morphology cannot bias its volume.
    """
    z = (np.arange(slices) - (slices - 1) / 2) * slice_spacing
    y = (np.arange(rows) - (rows - 1) / 2) * pixel_spacing  # +y is posterior (LPS)
    x = (np.arange(cols) - (cols - 1) / 2) * pixel_spacing  # +x is patient left
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    z_len = max(float(z[-1] - z[0]), 1.0)
    frac = (zz - z[0]) / z_len  # 0 at the feet end of the scan, 1 at the head end

    labels = np.zeros((slices, rows, cols), dtype=np.uint8)

    def put(region: np.ndarray, label: int) -> None:
        labels[np.broadcast_to(region, labels.shape)] = label

    # Body: an elliptic cylinder through every slice, 15 mm of subcutaneous fat around muscle.
    put((xx / 170.0) ** 2 + (yy / 120.0) ** 2 <= 1.0, FAT)
    put((xx / 155.0) ** 2 + (yy / 105.0) ** 2 <= 1.0, SOFT)
    # Spine: a bone cylinder posterior, through every slice.
    put(xx**2 + (yy - 80.0) ** 2 <= 16.0**2, BONE)
    # Lungs: two closed ellipsoids in the upper part of the scan.
    lung_z = ((frac - 0.65) / 0.30) ** 2
    for side in (-1.0, 1.0):
        put(((xx - side * 65.0) / 45.0) ** 2 + ((yy + 5.0) / 60.0) ** 2 + lung_z <= 1.0, LUNG)
    # Lower part: a visceral fat pad and a bowel gas bubble too small to count as lung.
    fat_z = ((frac - 0.20) / 0.12) ** 2
    put(((xx + 40.0) / 30.0) ** 2 + ((yy + 55.0) / 20.0) ** 2 + fat_z <= 1.0, FAT)
    gas_z = (zz - (z[0] + 0.20 * z_len)) ** 2
    put((xx - 40.0) ** 2 + (yy + 50.0) ** 2 + gas_z <= 10.0**2, GAS)
    return labels


def phantom_hu(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hounsfield units of a label map with Gaussian noise, clipped to what CT stores."""
    table = np.array([HU[i] for i in range(len(HU))], dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_HU, labels.shape).astype(np.float32)
    hu: np.ndarray = np.clip(table[labels] + noise, -1024.0, 3071.0)
    return hu


def truth_volumes_ml(labels: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Voxel count x voxel volume of each segment in the label map."""
    counts = np.bincount(labels.ravel(), minlength=len(HU))
    return {
        name: float(sum(int(counts[i]) for i in members)) * voxel_ml
        for name, members in SEGMENT_LABELS.items()
    }


def decimal_string(value: float) -> str:
    """A Decimal String (PS3.5 6.2: at most 16 characters) for a position or spacing in mm."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def derived_uid(*parts: object) -> str:
    """A UID derived from `parts`: the same parts give the same UID on every run."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def write_phantom_series(
    folder: Path,
    *,
    slices: int = 120,
    rows: int = 256,
    cols: int = 256,
    pixel_spacing: float = 1.5,
    slice_spacing: float = 2.5,
    study_uid: str | None = None,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    shuffle_names: bool = True,
    series_number: int = 1,
    seed: int = 0,
) -> PhantomTruth:
    """Write the phantom as a CT Image Storage series, one file per slice, into `folder`.

    UIDs are derived from `study_uid` (random if None), the series number and the seed, so the
    same arguments give the same UIDs. With `shuffle_names`, file names do not follow slice
    order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or str(generate_uid())
    series_uid = derived_uid("phantom series", study_uid, series_number, seed)
    frame_uid = derived_uid("phantom frame", study_uid, series_number, seed)
    labels = phantom_labels(slices, rows, cols, pixel_spacing, slice_spacing)
    stored = np.round(phantom_hu(labels, seed) + 1024.0).astype(np.uint16)
    x0 = -(cols - 1) / 2 * pixel_spacing
    y0 = -(rows - 1) / 2 * pixel_spacing
    z0 = -(slices - 1) / 2 * slice_spacing
    sop_uids: list[str] = []
    files: list[Path] = []
    for index in range(slices):
        sop_uid = derived_uid("phantom instance", series_uid, index)
        ds = ct_slice_header(study_uid, series_uid, frame_uid, sop_uid, series_number)
        ds.InstanceNumber = index + 1
        z = z0 + index * slice_spacing
        ds.ImagePositionPatient = [decimal_string(x0), decimal_string(y0), decimal_string(z)]
        ds.SliceLocation = decimal_string(z)
        ds.PixelSpacing = [decimal_string(pixel_spacing), decimal_string(pixel_spacing)]
        ds.SliceThickness = decimal_string(slice_spacing)
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = stored[index].tobytes()
        if transfer_syntax.is_compressed:
            ds.file_meta = ct_file_meta(sop_uid, ExplicitVRLittleEndian)
            ds.compress(transfer_syntax)
        else:
            ds.file_meta = ct_file_meta(sop_uid, transfer_syntax)
        if shuffle_names:
            name = hashlib.sha256(sop_uid.encode()).hexdigest()[:16]
        else:
            name = f"slice{index:04d}"
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        files.append(path)
    voxel_ml = pixel_spacing * pixel_spacing * slice_spacing / 1000.0
    return PhantomTruth(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uids=tuple(sop_uids),
        files=tuple(files),
        volumes_ml=truth_volumes_ml(labels, voxel_ml),
    )


def ct_file_meta(sop_uid: str, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def set_patient_and_study(ds: Dataset, study_uid: str) -> None:
    """The phantom's Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) in `ds`."""
    ds.PatientName = "PHANTOM^CT"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "PHANTOM1"
    ds.ReferringPhysicianName = ""


def ct_slice_header(
    study_uid: str, series_uid: str, frame_uid: str, sop_uid: str, series_number: int
) -> Dataset:
    """Everything of one slice but its position and pixels."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    set_patient_and_study(ds, study_uid)
    # General Series, Frame of Reference, General Equipment (PS3.3 C.7.3.1, C.7.4.1, C.7.5.1).
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "phantom"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "pacs-agent test phantom"
    # General Image, Image Plane, Image Pixel and CT Image modules (PS3.3 C.7.6.1, C.7.6.2,
    # C.7.6.3, C.8.2.1).
    ds.AcquisitionNumber = 1
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds
