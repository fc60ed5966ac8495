"""Read the geometry and pixel transform of each 2-D frame of a CT, MR or PET image instance.

A single-frame image (CT Image, MR Image, PET Image Storage) is one frame; an Enhanced or Legacy
Converted Enhanced instance has one frame per item of its Per-frame Functional Groups Sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

SINGLE_FRAME_SOP_CLASSES: frozenset[str] = frozenset(
    {CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage}
)
MULTI_FRAME_SOP_CLASSES: frozenset[str] = frozenset(
    {
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
        EnhancedPETImageStorage,
        LegacyConvertedEnhancedPETImageStorage,
    }
)
IMAGE_SOP_CLASSES: frozenset[str] = SINGLE_FRAME_SOP_CLASSES | MULTI_FRAME_SOP_CLASSES

# The stack key. Each item is "<keyword> <value>", for the attributes that tell apart several
# images at one position of one series:
# - single-frame: TemporalPositionIdentifier (PS3.3 C.7.6.2), EchoNumbers, DiffusionBValue and
#   DiffusionGradientOrientation (MR diffusion), plus the weak keys below;
# - multi-frame: StackID and TemporalPositionIndex (Frame Content, PS3.3 C.7.6.16.2.2),
#   EffectiveEchoTime (MR Echo), DiffusionBValue and DiffusionGradientOrientation (MR Diffusion),
#   every other non-spatial dimension of the Multi-frame Dimension Module (PS3.3 C.7.6.17),
#   and FrameType as a weak key.
# Weak keys vary on some scanners from slice to slice of one volume (a CT acquired step and
# shoot counts an acquisition per rotation; each PET bed position has its own frame time), so
# they split frames into stacks only where they would otherwise collide at one position.
WEAK_KEYS: frozenset[str] = frozenset(
    {"AcquisitionNumber", "TriggerTime", "FrameReferenceTime", "ImageType", "FrameType"}
)
_SINGLE_FRAME_KEYS = (
    "AcquisitionNumber",
    "TemporalPositionIdentifier",
    "EchoNumbers",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    "TriggerTime",
    "FrameReferenceTime",
    "ImageType",
)
# Dimensions that order frames in space, or that are already in the key under their own name.
_SKIPPED_DIMENSIONS = frozenset(
    {
        "ImagePositionPatient",
        "InStackPositionNumber",
        "SliceLocation",
        "StackID",
        "TemporalPositionIndex",
        "EffectiveEchoTime",
        "DiffusionBValue",
        "DiffusionGradientOrientation",
    }
)


@dataclass(frozen=True)
class Frame:
    """The geometry and pixel transform of one 2-D frame: a single-frame image or one frame of a
    multi-frame one."""

    path: Path
    index: int  # 0-based frame index within the instance (0 for single-frame)
    sop_uid: str
    sop_class_uid: str
    position: tuple[float, float, float]  # ImagePositionPatient / PlanePositionSequence
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), PS3.3 10.7.1.3
    shape: tuple[int, int]  # (Rows, Columns)
    slope: float  # RescaleSlope or PixelValueTransformationSequence; 1 if absent
    intercept: float  # 0 if absent
    thickness: float | None  # SliceThickness / PixelMeasuresSequence SliceThickness
    stack_key: tuple[str, ...]  # "<keyword> <value>" items, see WEAK_KEYS above
    instance_number: int | None = None  # InstanceNumber; with `index`, the order as stored
    image_type: tuple[str, ...] = ()  # ImageType, or FrameType of a multi-frame frame
    frame_of_reference_uid: str = ""
    gantry_tilt: float | None = None  # GantryDetectorTilt, degrees; informative only

    @property
    def normal(self) -> np.ndarray:
        """The unit slice normal: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        unit: np.ndarray = normal / np.linalg.norm(normal)
        return unit


def key_keyword(item: str) -> str:
    """The keyword of one stack key item: "AcquisitionNumber" for "AcquisitionNumber 2"."""
    return item.split(" ", 1)[0]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Sequence):
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


def _key_item(keyword: str, value: Any) -> str | None:
    text = "" if value is None else _text(value)
    return f"{keyword} {text}" if text else None


def _floats(value: Any, count: int, name: str) -> tuple[float, ...] | str:
    """`count` finite numbers from a (multi-)value attribute, or why not."""
    if value is None or value == "":
        return f"missing {name}"
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) != count:
        return f"invalid {name} ({len(values)} values, {count} expected)"
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return f"invalid {name} (not numbers)"
    if not all(math.isfinite(v) for v in numbers):
        return f"invalid {name} (not finite)"
    return numbers


def _optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _optional_int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _orientation_problem(orientation: Sequence[float]) -> str | None:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    if float(np.linalg.norm(np.cross(row, col))) < 1e-6:
        return "degenerate ImageOrientationPatient (row and column directions parallel or zero)"
    # PS3.3 C.7.6.2.1.1: two orthogonal unit vectors. 0.01 allows for rounding to few digits.
    lengths_ok = abs(np.linalg.norm(row) - 1) <= 0.01 and abs(np.linalg.norm(col) - 1) <= 0.01
    if not lengths_ok or abs(float(row @ col)) > 0.01:
        return "invalid ImageOrientationPatient (not two orthogonal unit vectors)"
    return None


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class _Header:
    """The attributes of one frame, gathered from wherever its instance keeps them."""

    position: Any
    orientation: Any
    pixel_spacing: Any
    thickness: Any
    slope: Any
    intercept: Any
    stack_key: tuple[str, ...]
    image_type: tuple[str, ...]
    gantry_tilt: Any


def _frame(path: Path, ds: Dataset, index: int, header: _Header) -> Frame | str:
    position = _floats(header.position, 3, "ImagePositionPatient")
    if isinstance(position, str):
        return position
    o = _floats(header.orientation, 6, "ImageOrientationPatient")
    if isinstance(o, str):
        return o
    spacing = _floats(header.pixel_spacing, 2, "PixelSpacing")
    if isinstance(spacing, str):
        return spacing
    if min(spacing) <= 0:
        return "invalid PixelSpacing (not positive)"
    problem = _orientation_problem(o)
    if problem is not None:
        return problem
    slope = _optional_float(header.slope)
    intercept = _optional_float(header.intercept)
    return Frame(
        path=path,
        index=index,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.SOPClassUID),
        position=(position[0], position[1], position[2]),
        orientation=(o[0], o[1], o[2], o[3], o[4], o[5]),
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(int(ds.Rows), int(ds.Columns)),
        # Rescale Slope and Intercept may be absent (MR): the stored values are the values.
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        thickness=_optional_float(header.thickness),
        stack_key=header.stack_key,
        instance_number=_optional_int(ds.get("InstanceNumber")),
        image_type=header.image_type,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        gantry_tilt=_optional_float(header.gantry_tilt),
    )


def frames_of(path: Path, ds: Dataset) -> list[Frame] | str:
    """The frames of one image instance (header read without pixel data), or why it has none
    usable (a specific reason: 'missing ImagePositionPatient', 'not an image (SOP class ...)')."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        return f"not an image (SOP class {UID(sop_class).name if sop_class else 'missing'})"
    rows, columns = _optional_int(ds.get("Rows")), _optional_int(ds.get("Columns"))
    if rows is None or columns is None or rows <= 0 or columns <= 0:
        return "missing or invalid Rows/Columns"
    samples = _optional_int(ds.get("SamplesPerPixel"))
    if samples not in (None, 1):
        return f"not a grayscale image (SamplesPerPixel {samples})"
    if sop_class in MULTI_FRAME_SOP_CLASSES:
        return _multi_frames(path, ds)
    count = _optional_int(ds.get("NumberOfFrames"))
    if count not in (None, 1):
        return f"NumberOfFrames {count} in a single-frame SOP class"
    key = (_key_item(keyword, ds.get(keyword)) for keyword in _SINGLE_FRAME_KEYS)
    header = _Header(
        position=ds.get("ImagePositionPatient"),
        orientation=ds.get("ImageOrientationPatient"),
        pixel_spacing=ds.get("PixelSpacing"),
        thickness=ds.get("SliceThickness"),
        slope=ds.get("RescaleSlope"),
        intercept=ds.get("RescaleIntercept"),
        stack_key=tuple(item for item in key if item is not None),
        image_type=_strings(ds.get("ImageType")),
        gantry_tilt=ds.get("GantryDetectorTilt"),
    )
    got = _frame(path, ds, 0, header)
    return got if isinstance(got, str) else [got]


def _macro(groups: Dataset | None, shared: Dataset, sequence: str) -> Dataset | None:
    """The item of a functional group macro, per-frame before shared (PS3.3 C.7.6.16.1)."""
    for source in (groups, shared):
        items = None if source is None else source.get(sequence)
        if items:
            item: Dataset = items[0]
            return item
    return None


def _get(item: Dataset | None, keyword: str) -> Any:
    return None if item is None else item.get(keyword)


def _dimension_keywords(ds: Dataset) -> list[str]:
    """The keyword each DimensionIndexValues entry points at (PS3.3 C.7.6.17.1)."""
    keywords = []
    for item in ds.get("DimensionIndexSequence") or ():
        pointer = item.get("DimensionIndexPointer")
        keywords.append("" if pointer is None else keyword_for_tag(pointer) or str(pointer))
    return keywords


def _frame_type(groups: Dataset, shared: Dataset) -> tuple[str, ...]:
    for sequence in (
        "CTImageFrameTypeSequence",
        "MRImageFrameTypeSequence",
        "PETFrameTypeSequence",
    ):
        item = _macro(groups, shared, sequence)
        if item is not None:
            return _strings(item.get("FrameType"))
    return ()


def _multi_frame_key(groups: Dataset, shared: Dataset, dimensions: Sequence[str]) -> list[str]:
    content = _macro(groups, shared, "FrameContentSequence")
    echo = _macro(groups, shared, "MREchoSequence")
    diffusion = _macro(groups, shared, "MRDiffusionSequence")
    direction = _macro(diffusion, Dataset(), "DiffusionGradientDirectionSequence")
    key = [
        _key_item("StackID", _get(content, "StackID")),
        _key_item("TemporalPositionIndex", _get(content, "TemporalPositionIndex")),
        _key_item("EffectiveEchoTime", _get(echo, "EffectiveEchoTime")),
        _key_item("DiffusionBValue", _get(diffusion, "DiffusionBValue")),
        _key_item("DiffusionGradientOrientation", _get(direction, "DiffusionGradientOrientation")),
    ]
    values = _get(content, "DimensionIndexValues")
    if values is not None and values != "":
        values = [values] if isinstance(values, int) else list(values)
        for keyword, value in zip(dimensions, values, strict=False):
            if keyword and keyword not in _SKIPPED_DIMENSIONS:
                key.append(f"{keyword} index {value}")
    frame_type = _frame_type(groups, shared)
    key.append(_key_item("FrameType", frame_type or None))
    return [item for item in key if item is not None]


def _multi_frames(path: Path, ds: Dataset) -> list[Frame] | str:
    count = _optional_int(ds.get("NumberOfFrames"))
    if count is None or count < 1:
        return "missing or invalid NumberOfFrames"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        return f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {count} frames"
    shared_items = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared: Dataset = shared_items[0]
    dimensions = _dimension_keywords(ds)
    frames: list[Frame] = []
    for index, groups in enumerate(per_frame):
        measures = _macro(groups, shared, "PixelMeasuresSequence")
        transform = _macro(groups, shared, "PixelValueTransformationSequence")
        header = _Header(
            position=_get(_macro(groups, shared, "PlanePositionSequence"), "ImagePositionPatient"),
            orientation=_get(
                _macro(groups, shared, "PlaneOrientationSequence"), "ImageOrientationPatient"
            ),
            pixel_spacing=_get(measures, "PixelSpacing"),
            thickness=_get(measures, "SliceThickness"),
            slope=_get(transform, "RescaleSlope"),
            intercept=_get(transform, "RescaleIntercept"),
            stack_key=tuple(_multi_frame_key(groups, shared, dimensions)),
            image_type=_frame_type(groups, shared),
            gantry_tilt=_get(
                _macro(groups, shared, "CTAcquisitionDetailsSequence"), "GantryDetectorTilt"
            ),
        )
        got = _frame(path, ds, index, header)
        if isinstance(got, str):
            return f"frame {index + 1} of {count}: {got}"
        frames.append(got)
    return frames
