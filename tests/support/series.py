"""Small synthetic image series, each with one chosen geometry defect, written as DICOM files.

The slices carry the phantom's CT header and anatomy (tests/support/phantom.py) at 64x64 pixels
of 6 mm, so a whole series is a few hundred kilobytes. Every `write_*` function takes a folder,
writes one series into it and returns a `Series`; positions are in mm, patient LPS.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.support.phantom import (
    ct_file_meta,
    ct_slice_header,
    decimal_string,
    derived_uid,
    phantom_hu,
    phantom_labels,
)

Orientation = tuple[float, float, float, float, float, float]
# ImageOrientationPatient (row direction, then column direction) of the usual planes.
AXIAL: Orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL: Orientation = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL: Orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

ROWS = COLUMNS = 64
PIXEL_SPACING = 6.0  # 384 mm field of view, what the phantom needs
SLICE_SPACING = 2.5
AXIAL_TYPE = ("ORIGINAL", "PRIMARY", "AXIAL")


def tilted(degrees: float) -> Orientation:
    """Axial planes turned about the patient's left-right axis, as a tilted gantry gives them."""
    t = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    """Row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    normal: np.ndarray = np.cross(orientation[:3], orientation[3:6])
    return normal


@dataclass(frozen=True, eq=False)
class SliceSpec:
    """One single-frame CT image to write: its geometry, numbering and stored pixel values."""

    position: tuple[float, float, float] | None  # None: ImagePositionPatient left out
    pixels: np.ndarray  # uint16 stored values, (rows, columns)
    orientation: Orientation = AXIAL
    pixel_spacing: float = PIXEL_SPACING
    instance_number: int | None = None
    acquisition_number: int = 1
    sop_uid: str | None = None  # None: derived from the series and the spec's index
    image_type: tuple[str, ...] = AXIAL_TYPE
    slope: float = 1.0
    intercept: float = -1024.0
    thickness: float | None = SLICE_SPACING
    gantry_tilt: float | None = None


@dataclass(frozen=True)
class Series:
    """What was written: UIDs and files in the order of the specs."""

    study_uid: str
    series_uid: str
    frame_uid: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...] = ()

    def headers(self) -> dict[Path, Dataset]:
        """Every file's header, read back without pixel data."""
        return {p: pydicom.dcmread(p, stop_before_pixels=True) for p in self.files}


def phantom_pixels(
    slices: int,
    *,
    rows: int = ROWS,
    columns: int = COLUMNS,
    pixel_spacing: float = PIXEL_SPACING,
    slice_spacing: float = SLICE_SPACING,
    seed: int = 0,
) -> np.ndarray:
    """The phantom's stored values (HU + 1024, uint16), (slices, rows, columns)."""
    labels = phantom_labels(slices, rows, columns, pixel_spacing, slice_spacing)
    stored: np.ndarray = np.round(phantom_hu(labels, seed) + 1024.0).astype(np.uint16)
    return stored


def stack_specs(
    slices: int = 12,
    *,
    orientation: Orientation = AXIAL,
    rows: int = ROWS,
    columns: int = COLUMNS,
    pixel_spacing: float = PIXEL_SPACING,
    slice_spacing: float = SLICE_SPACING,
    seed: int = 0,
) -> list[SliceSpec]:
    """A clean stack centred on the origin, slice k at k x slice_spacing along the normal, with
    instance numbers ascending along the normal."""
    pixels = phantom_pixels(
        slices,
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        seed=seed,
    )
    row_dir = np.asarray(orientation[:3])
    col_dir = np.asarray(orientation[3:])
    normal = normal_of(orientation)
    # ImagePositionPatient is the centre of the first pixel (PS3.3 C.7.6.2.1.1).
    corner = -(columns - 1) / 2 * pixel_spacing * row_dir - (rows - 1) / 2 * pixel_spacing * col_dir
    specs = []
    for k in range(slices):
        p = corner + (k - (slices - 1) / 2) * slice_spacing * normal
        specs.append(
            SliceSpec(
                position=(float(p[0]), float(p[1]), float(p[2])),
                pixels=pixels[k],
                orientation=orientation,
                pixel_spacing=pixel_spacing,
                instance_number=k + 1,
                thickness=slice_spacing,
            )
        )
    return specs


def write_specs(
    folder: Path,
    specs: Sequence[SliceSpec],
    *,
    study_uid: str | None = None,
    series_number: int = 1,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> Series:
    """Write one CT Image Storage file per spec (the same SOP instance twice if specs repeat a
    sop_uid); file names do not follow slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or str(generate_uid())
    series_uid = derived_uid("series", study_uid, series_number)
    frame_uid = derived_uid("frame", study_uid, series_number)
    files: list[Path] = []
    sop_uids: list[str] = []
    for index, spec in enumerate(specs):
        sop_uid = spec.sop_uid or derived_uid("instance", series_uid, index)
        ds = ct_slice_header(study_uid, series_uid, frame_uid, sop_uid, series_number)
        ds.ImageType = list(spec.image_type)
        ds.ImageOrientationPatient = [decimal_string(v) for v in spec.orientation]
        if spec.position is not None:
            ds.ImagePositionPatient = [decimal_string(v) for v in spec.position]
        ds.PixelSpacing = [decimal_string(spec.pixel_spacing)] * 2
        if spec.thickness is not None:
            ds.SliceThickness = decimal_string(spec.thickness)
        if spec.instance_number is not None:
            ds.InstanceNumber = spec.instance_number
        ds.AcquisitionNumber = spec.acquisition_number
        ds.RescaleSlope = decimal_string(spec.slope)
        ds.RescaleIntercept = decimal_string(spec.intercept)
        if spec.gantry_tilt is not None:
            ds.GantryDetectorTilt = decimal_string(spec.gantry_tilt)
        ds.Rows, ds.Columns = spec.pixels.shape
        ds.PixelData = spec.pixels.astype(np.uint16).tobytes()
        ds.file_meta = ct_file_meta(sop_uid, ExplicitVRLittleEndian)
        if transfer_syntax.is_compressed:
            ds.compress(transfer_syntax)
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        name = hashlib.sha256(f"{sop_uid}/{index}".encode()).hexdigest()[:16]
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sop_uids.append(sop_uid)
    return Series(study_uid, series_uid, frame_uid, tuple(files), tuple(sop_uids))


def write_series(
    folder: Path,
    slices: int = 12,
    *,
    orientation: Orientation = AXIAL,
    slice_spacing: float = SLICE_SPACING,
    seed: int = 0,
    study_uid: str | None = None,
    series_number: int = 1,
) -> Series:
    """A clean series: `slices` images along the normal of `orientation`."""
    specs = stack_specs(slices, orientation=orientation, slice_spacing=slice_spacing, seed=seed)
    return write_specs(folder, specs, study_uid=study_uid, series_number=series_number)


def write_sagittal(folder: Path, slices: int = 12) -> Series:
    """A clean sagittal series (normal along patient x)."""
    return write_series(folder, slices, orientation=SAGITTAL)


def write_oblique(folder: Path, slices: int = 12, degrees: float = 20.0) -> Series:
    """Planes tilted by `degrees` about patient x, the positions stepping along their own normal:
    a valid oblique stack. GantryDetectorTilt says the tilt."""
    specs = stack_specs(slices, orientation=tilted(degrees))
    return write_specs(folder, [replace(s, gantry_tilt=degrees) for s in specs])


def write_with_localizer(folder: Path, slices: int = 12, *, flagged: bool = True) -> Series:
    """A clean axial series and one scout of another orientation, size and pixel spacing (the
    last file), its ImageType LOCALIZER if `flagged`."""
    specs = stack_specs(slices)
    scout = SliceSpec(
        position=(-190.0, 0.0, 150.0),
        pixels=np.full((80, 64), 1024, dtype=np.uint16),
        orientation=CORONAL,
        pixel_spacing=4.8,
        instance_number=slices + 1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER" if flagged else "OTHER"),
        thickness=None,
    )
    return write_specs(folder, [*specs, scout])


def write_two_acquisitions(folder: Path, slices: int = 10) -> Series:
    """Two acquisitions of the same positions in one series: AcquisitionNumber 1, then 2 with
    other noise; instance numbers run on through both."""
    first = stack_specs(slices, seed=1)
    second = stack_specs(slices, seed=2)
    specs = [
        *first,
        *(
            replace(s, acquisition_number=2, instance_number=slices + k + 1)
            for k, s in enumerate(second)
        ),
    ]
    return write_specs(folder, specs)


def write_with_duplicates(
    folder: Path,
    slices: int = 12,
    *,
    resent: Sequence[int] = (),
    copies: Sequence[int] = (),
    different: Sequence[int] = (),
) -> Series:
    """A clean series plus, after it, one more file per listed slice index: `resent` repeats the
    SOP instance itself (received twice), `copies` is another SOP instance with the same
    position and pixels, `different` another one at the same position with other pixels."""
    specs = stack_specs(slices)
    series_uid = derived_uid("duplicates", folder, slices)
    uids = [derived_uid(series_uid, k) for k in range(slices)]
    specs = [replace(s, sop_uid=u) for s, u in zip(specs, uids, strict=True)]
    extra = [replace(specs[k], sop_uid=uids[k]) for k in resent]
    extra += [replace(specs[k], sop_uid=None) for k in copies]
    other = phantom_pixels(slices, seed=99)
    extra += [replace(specs[k], sop_uid=None, pixels=other[k]) for k in different]
    return write_specs(folder, [*specs, *extra])


def write_with_gap(folder: Path, slices: int = 12, missing: Sequence[int] = (5,)) -> Series:
    """A series with the slices at the listed indexes of a clean stack left out."""
    specs = stack_specs(slices)
    return write_specs(folder, [s for k, s in enumerate(specs) if k not in set(missing)])


def write_non_uniform(
    folder: Path, slices: int = 12, *, index: int = 6, shift_mm: float = 0.6
) -> Series:
    """A series with slice `index` moved by `shift_mm` along z: two gaps off by shift_mm, none
    large enough to be a missing slice."""
    specs = stack_specs(slices)
    moved = specs[index]
    assert moved.position is not None
    x, y, z = moved.position
    specs[index] = replace(moved, position=(x, y, z + shift_mm))
    return write_specs(folder, specs)


def write_sheared(folder: Path, slices: int = 12, degrees: float = 15.0) -> Series:
    """Axial planes whose positions drift in y by tan(degrees) per mm of z, as a tilted gantry
    reconstructed onto untilted planes gives them; GantryDetectorTilt says `degrees`."""
    specs = stack_specs(slices)
    slope = math.tan(math.radians(degrees))
    sheared = []
    for s in specs:
        assert s.position is not None
        x, y, z = s.position
        sheared.append(replace(s, position=(x, y + slope * z, z), gantry_tilt=degrees))
    return write_specs(folder, sheared)


def write_renumbered(folder: Path, slices: int = 12, *, order: str = "reversed") -> Series:
    """A clean series whose instance numbers run against the normal ("reversed", as a head-first
    scan numbered from the head) or are shuffled ("shuffled")."""
    specs = stack_specs(slices)
    numbers = list(range(slices, 0, -1))
    if order == "shuffled":
        numbers = [int(n) + 1 for n in np.random.default_rng(7).permutation(slices)]
    elif order != "reversed":
        raise ValueError(f"unknown order {order!r}")
    return write_specs(
        folder, [replace(s, instance_number=n) for s, n in zip(specs, numbers, strict=True)]
    )


def write_without_position(folder: Path, slices: int = 12, missing: Sequence[int] = (3,)) -> Series:
    """A clean series but for the listed slices, which lack ImagePositionPatient."""
    specs = stack_specs(slices)
    return write_specs(
        folder, [replace(s, position=None) if k in missing else s for k, s in enumerate(specs)]
    )


@dataclass(frozen=True, eq=False)
class _EnhancedFrame:
    position: tuple[float, float, float]
    pixels: np.ndarray
    stack_id: str
    in_stack_position: int  # 1-based, ascending along the normal


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _frame_type(frame_type: list[str]) -> Dataset:
    """A CT or MR Image Frame Type item (PS3.3 C.8.15.3.1, C.8.13.5.1) of a whole volume."""
    return _item(
        FrameType=frame_type,
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )


def _triple(values: Sequence[object]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)  # type: ignore[arg-type]
    return (x, y, z)


def _orientation(values: Sequence[object]) -> Orientation:
    a, b, c, d, e, f = (float(v) for v in values)  # type: ignore[arg-type]
    return (a, b, c, d, e, f)


def _enhanced_header(study_uid: str, frame_uid: str, sop_uid: str, sop_class: str) -> Dataset:
    """The phantom header without the single-frame image plane and pixel transform attributes."""
    ds = ct_slice_header(study_uid, derived_uid("series of", sop_uid), frame_uid, sop_uid, 2)
    for keyword in (
        "ImageOrientationPatient",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = sop_class
    ds.InstanceNumber = 1
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def _save_enhanced(
    path: Path,
    ds: Dataset,
    frames: Sequence[_EnhancedFrame],
    shared: Dataset,
) -> Path:
    """Add the frames to `ds`, with `shared` as its shared functional groups, and save it.

    Position and Frame Content go per frame (Multi-frame Functional Groups, PS3.3 C.7.6.16);
    frames are indexed by Stack ID and In-Stack Position Number (Dimensions, C.7.6.17).
    """
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0].pixels.shape
    organization = derived_uid("dimensions", ds.SOPInstanceUID)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=pointer,
            FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
        )
        for pointer in (0x00209056, 0x00209057)  # Stack ID, In-Stack Position Number
    ]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            PlanePositionSequence=[
                _item(ImagePositionPatient=[decimal_string(v) for v in f.position])
            ],
            FrameContentSequence=[
                _item(
                    StackID=f.stack_id,
                    InStackPositionNumber=f.in_stack_position,
                    DimensionIndexValues=[int(f.stack_id), f.in_stack_position],
                )
            ],
        )
        for f in frames
    ]
    ds.PixelData = b"".join(f.pixels.astype(np.uint16).tobytes() for f in frames)
    ds.file_meta = ct_file_meta(ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _shared(
    orientation: Orientation, pixel_spacing: float, thickness: float, **macros: list[Dataset]
) -> Dataset:
    """Shared functional groups: Plane Orientation, Pixel Measures and the given macros."""
    return _item(
        PlaneOrientationSequence=[
            _item(ImageOrientationPatient=[decimal_string(v) for v in orientation])
        ],
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=[decimal_string(pixel_spacing)] * 2,
                SliceThickness=decimal_string(thickness),
            )
        ],
        **macros,
    )


def shuffled(count: int, seed: int = 3) -> list[int]:
    """A fixed permutation of range(count), for frames stored out of slice order."""
    return [int(i) for i in np.random.default_rng(seed).permutation(count)]


def write_enhanced_ct(path: Path, source: Series, order: Sequence[int] | None = None) -> Path:
    """The single-frame CT series `source` as one Enhanced CT Image (PS3.3 A.38) at `path`.

    Frame f holds the image of source.files[order[f]] (default: shuffled(), so frames are
    stored out of slice order). The source must share one orientation, pixel spacing,
    thickness and rescale: they go in the shared functional groups.
    """
    images = [pydicom.dcmread(p) for p in source.files]
    order = shuffled(len(images)) if order is None else list(order)
    first = images[0]
    orientation = _orientation(first.ImageOrientationPatient)
    normal = normal_of(orientation)
    along = [float(normal @ np.asarray(_triple(ds.ImagePositionPatient))) for ds in images]
    rank = {k: r + 1 for r, k in enumerate(sorted(range(len(images)), key=along.__getitem__))}
    sop_uid = derived_uid("enhanced ct", source.series_uid, tuple(order))
    ds = _enhanced_header(source.study_uid, source.frame_uid, sop_uid, EnhancedCTImageStorage)
    image_type = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ImageType = image_type
    shared = _shared(
        orientation,
        float(first.PixelSpacing[0]),
        float(first.SliceThickness),
        PixelValueTransformationSequence=[
            _item(
                RescaleSlope=first.RescaleSlope,
                RescaleIntercept=first.RescaleIntercept,
                RescaleType="HU",
            )
        ],
        CTImageFrameTypeSequence=[_frame_type(image_type)],
    )
    frames = [
        _EnhancedFrame(_triple(images[k].ImagePositionPatient), images[k].pixel_array, "1", rank[k])
        for k in order
    ]
    return _save_enhanced(path, ds, frames, shared)


def write_legacy_enhanced_ct(
    path: Path, source: Series, order: Sequence[int] | None = None
) -> Path:
    """The single-frame CT series `source` as a Legacy Converted Enhanced CT Image made by
    highdicom, frames in the order of source.files[order[f]] (default: shuffled())."""
    order = shuffled(len(source.files)) if order is None else list(order)
    image = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(source.files[k]) for k in order],
        series_instance_uid=derived_uid("legacy series", source.series_uid),
        series_number=3,
        sop_instance_uid=derived_uid("legacy", source.series_uid, tuple(order)),
        instance_number=1,
        # Keep the given frame order rather than let highdicom sort the frames.
        include_dimension_index=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path, enforce_file_format=True)
    return path


def write_enhanced_mr(
    path: Path,
    *,
    stacks: int = 2,
    frames_per_stack: int = 6,
    offset_mm: float = 0.0,
    slice_spacing: float = 4.0,
) -> Path:
    """An Enhanced MR Image (PS3.3 A.36) with `stacks` axial stacks (StackID "1", "2", ...),
    stack s shifted by s x offset_mm along z (0: all at the same positions), frames of the
    stacks interleaved in storage order. No rescale: MR stored values are the values."""
    sop_uid = derived_uid("enhanced mr", stacks, frames_per_stack, offset_mm)
    study_uid = derived_uid("study of", sop_uid)
    ds = _enhanced_header(
        study_uid, derived_uid("frame of", sop_uid), sop_uid, EnhancedMRImageStorage
    )
    ds.Modality = "MR"
    image_type = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    ds.ImageType = image_type
    del ds.KVP
    shared = _shared(
        AXIAL,
        PIXEL_SPACING,
        slice_spacing,
        MRImageFrameTypeSequence=[_frame_type(image_type)],
    )
    specs = [
        stack_specs(frames_per_stack, slice_spacing=slice_spacing, seed=s) for s in range(stacks)
    ]
    frames = []
    for k in range(frames_per_stack):
        for s in range(stacks):
            spec = specs[s][k]
            assert spec.position is not None
            x, y, z = spec.position
            frames.append(_EnhancedFrame((x, y, z + s * offset_mm), spec.pixels, str(s + 1), k + 1))
    return _save_enhanced(path, ds, frames, shared)
