"""Choose the CT series of a study that a model can use and load it as a Hounsfield-unit volume."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from agent.dicom.files import read_dicom
from agent.errors import PermanentError, StudySkipped

log = logging.getLogger(__name__)

# The slice normal may lean at most this far from the patient z axis (gantry tilt, slightly
# oblique reconstructions) for the series to count as axial.
AXIAL_TOLERANCE_DEG = 10.0
# Largest allowed deviation of any slice gap from the median gap, as a fraction of the median.
SPACING_TOLERANCE = 0.10
# Two slices closer than this (mm along the normal) occupy the same position.
DUPLICATE_TOLERANCE_MM = 0.01
MIN_SLICES = 3
# Orientation cosines and pixel spacings of one series must agree to this precision.
_GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True, eq=False)
class Volume:
    """One CT series as a (z, y, x) array of Hounsfield units with its geometry and headers."""

    hu: np.ndarray  # float32, (z, y, x), z ascending along the slice normal
    spacing: tuple[float, float, float]  # (z, y, x) in mm; z from the slice positions
    files: tuple[Path, ...]  # slice order, as hu[z]
    headers: tuple[Dataset, ...]  # same order, without pixel data


@dataclass(frozen=True)
class _Slice:
    """The geometry of one single-frame image, enough to stack it."""

    path: Path
    sop_uid: str
    position: float  # ImagePositionPatient projected on the slice normal, mm
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]


def _normal(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    return normal / norm


def _is_axial(normal: np.ndarray) -> bool:
    # Patient z is the head-foot axis of the patient coordinate system (PS3.3 C.7.6.2.1.1).
    return abs(float(normal[2])) >= math.cos(math.radians(AXIAL_TOLERANCE_DEG))


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 0


def _slice_of(path: Path, ds: Dataset) -> _Slice | str:
    """The stacking geometry of one CT instance, or why it cannot be a slice of a volume."""
    if _frames(ds) != 1:
        return "multi-frame"
    try:
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        position = tuple(float(v) for v in ds.ImagePositionPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        return (
            "missing or invalid ImageOrientationPatient, ImagePositionPatient, PixelSpacing or size"
        )
    if len(orientation) != 6 or len(position) != 3 or len(spacing) != 2:
        return "invalid geometry attribute multiplicity"
    if min(spacing) <= 0 or min(shape) <= 0:
        return "invalid PixelSpacing or image size"
    try:
        normal = _normal(orientation)
    except ValueError:
        return "degenerate ImageOrientationPatient"
    if not _is_axial(normal):
        return "not axial"
    return _Slice(
        path=path,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        position=float(np.dot(normal, np.asarray(position, dtype=np.float64))),
        orientation=orientation,
        pixel_spacing=(spacing[0], spacing[1]),
        shape=shape,
    )


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= _GEOMETRY_TOLERANCE for x, y in zip(a, b, strict=True))


def _dedupe(slices: Sequence[_Slice]) -> list[_Slice]:
    """Drop repeated copies of one SOP instance (the same image received twice)."""
    seen: set[str] = set()
    unique: list[_Slice] = []
    for s in sorted(slices, key=lambda s: str(s.path)):
        if s.sop_uid and s.sop_uid in seen:
            continue
        seen.add(s.sop_uid)
        unique.append(s)
    return unique


def _stack(slices: Sequence[_Slice]) -> tuple[list[_Slice], float] | str:
    """Slices sorted along the normal and their spacing, or why they do not form a volume."""
    if len(slices) < MIN_SLICES:
        return f"fewer than {MIN_SLICES} slices ({len(slices)})"
    first = slices[0]
    for s in slices[1:]:
        if not _close(s.orientation, first.orientation):
            return "slices differ in orientation"
        if s.shape != first.shape:
            return "slices differ in Rows/Columns"
        if not _close(s.pixel_spacing, first.pixel_spacing):
            return "slices differ in PixelSpacing"
    ordered = sorted(slices, key=lambda s: (s.position, str(s.path)))
    try:
        spacing = slice_spacing([s.position for s in ordered])
    except ValueError as exc:
        return str(exc)
    return ordered, spacing


def slice_spacing(positions: Sequence[float]) -> float:
    """The distance between slices (mm) from their positions along the slice normal.

    This, not SliceThickness, is the z voxel size: overlapping or gapped reconstructions have
    a thickness different from their spacing. ValueError says why positions are no stack.
    """
    if len(positions) < 2:
        raise ValueError("fewer than 2 slices")
    gaps = np.diff(np.sort(np.asarray(positions, dtype=np.float64)))
    if float(gaps.min()) < DUPLICATE_TOLERANCE_MM:
        raise ValueError("series has duplicate slice positions")
    median = float(np.median(gaps))
    if float(np.abs(gaps - median).max()) > SPACING_TOLERANCE * median:
        raise ValueError(
            f"irregular slice spacing (gaps {float(gaps.min()):.3g} to "
            f"{float(gaps.max()):.3g} mm, median {median:.3g} mm)"
        )
    return median


@dataclass(frozen=True)
class _Candidate:
    """One CT series and either its stacked slices or the reason it is unusable."""

    series_uid: str
    series_number: int | None
    size: int
    stacked: list[_Slice] | None
    reason: str
    # True if every instance is an axial single-frame image and only the stack failed.
    stack_failed: bool = False

    def label(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        return f"CT series {number} ({self.size} instances)"


def _series_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _candidate(series_uid: str, members: Sequence[tuple[Path, Dataset]]) -> _Candidate:
    number = _series_number(members[0][1])
    slices: list[_Slice] = []
    for path, ds in members:
        got = _slice_of(path, ds)
        if isinstance(got, str):
            return _Candidate(series_uid, number, len(members), None, got)
        slices.append(got)
    stacked = _stack(_dedupe(slices))
    if isinstance(stacked, str):
        return _Candidate(series_uid, number, len(members), None, stacked, stack_failed=True)
    return _Candidate(series_uid, number, len(stacked[0]), stacked[0], "")


def _rank(c: _Candidate) -> tuple[int, float, str]:
    # Largest first; ties to the lowest SeriesNumber, then the UID, so the choice is stable.
    return (-c.size, math.inf if c.series_number is None else c.series_number, c.series_uid)


def select_series(headers: Mapping[Path, Dataset]) -> tuple[Path, ...]:
    """The files of the largest usable axial CT series, sorted along the slice normal.

    Raises StudySkipped with a PHI-free reason if no series of the study is usable.
    """
    modalities = sorted({str(ds.get("Modality", "")) or "?" for ds in headers.values()})
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, ds in headers.items():
        # Only CT Image Storage instances are slices (PS3.4 B.5); SEG, SR, presentation
        # states and Enhanced/Legacy Converted multi-frame CT are not fed to the model.
        if str(ds.get("Modality", "")) != "CT" or ds.get("SOPClassUID") != CTImageStorage:
            continue
        groups[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if "CT" not in modalities:
        raise StudySkipped(f"no CT series (modalities: {', '.join(modalities) or 'none'})")
    if not groups:
        raise StudySkipped("no axial single-frame CT series (no CT Image Storage instances)")
    candidates = sorted(
        (
            _candidate(uid, sorted(members, key=lambda m: str(m[0])))
            for uid, members in groups.items()
        ),
        key=_rank,
    )
    usable = [c for c in candidates if c.stacked is not None]
    if not usable:
        geometric = [c for c in candidates if c.stack_failed]
        if not geometric:
            details = "; ".join(f"{c.label()}: {c.reason}" for c in candidates)
            raise StudySkipped(f"no axial single-frame CT series ({details})")
        best = geometric[0]
        raise StudySkipped(f"{best.reason} in {best.label()}")
    chosen = usable[0]
    assert chosen.stacked is not None
    log.info(
        "selected %s of %d CT series, %d slices",
        chosen.label(),
        len(candidates),
        len(chosen.stacked),
    )
    return tuple(s.path for s in chosen.stacked)


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to Hounsfield units (PS3.3 C.11.1.1.2: HU = stored x slope + intercept)."""
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _decode(path: Path) -> tuple[Dataset, np.ndarray]:
    """The header (pixel data removed) and the HU image of one slice."""
    ds = read_dicom(path, pixels=True)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", str(syntax))
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder plugins raise their own types
        raise PermanentError(
            f"cannot decode pixel data of {path.name} (transfer syntax {syntax_name}): {exc}"
        ) from exc
    if stored.ndim != 2:
        raise PermanentError(f"{path.name} is not a single-frame grayscale image")
    # Rescale Slope/Intercept are Type 1 in the CT Image Module (PS3.3 C.8.2.1), but tolerate
    # their absence as the identity like most viewers do.
    hu = rescale(
        stored, float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    )
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds, hu


def load_volume(files: Sequence[Path]) -> Volume:
    """Decode the slices of one series (compressed ones too) into a Volume in slice order."""
    if not files:
        raise PermanentError("no files to load")
    decoded = [(Path(p), *_decode(Path(p))) for p in files]
    slices: list[_Slice] = []
    for path, ds, _ in decoded:
        got = _slice_of(path, ds)
        if isinstance(got, str):
            raise PermanentError(f"{path.name} cannot be stacked: {got}")
        slices.append(got)
    # Re-check the geometry: the files may have changed since the series was selected.
    stacked = _stack(slices)
    if isinstance(stacked, str):
        raise PermanentError(f"the series does not form a volume: {stacked}")
    ordered, z_spacing = stacked
    by_path = {path: (ds, hu) for path, ds, hu in decoded}
    for s in ordered:
        if by_path[s.path][1].shape != s.shape:
            raise PermanentError(f"{s.path.name}: pixel data does not match Rows/Columns")
    hu = np.stack([by_path[s.path][1] for s in ordered])
    # PixelSpacing is (row spacing = between rows, i.e. along y; column spacing along x),
    # PS3.3 10.7.1.3.
    row_spacing, col_spacing = ordered[0].pixel_spacing
    volume = Volume(
        hu=hu,
        spacing=(z_spacing, row_spacing, col_spacing),
        files=tuple(s.path for s in ordered),
        headers=tuple(by_path[s.path][0] for s in ordered),
    )
    log.info(
        "loaded volume %s, spacing %s mm", hu.shape, tuple(round(v, 3) for v in volume.spacing)
    )
    return volume
