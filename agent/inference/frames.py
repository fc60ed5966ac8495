"""Read the geometry and pixel transform of each 2-D frame of a CT, MR or PET image instance.

A single-frame image (CT Image, MR Image, PET Image Storage) is one frame; an Enhanced or Legacy
Converted Enhanced instance has one frame per item of its Per-frame Functional Groups Sequence,
read by multiframe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


def key_item(keyword: str, value: Any) -> str | None:
    """One stack key item, "<keyword> <value>", or None where the value is absent or empty."""
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


def optional_int(value: Any) -> int | None:
    """An integer attribute's value, or None where it is absent or not a number."""
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


def strings(value: Any) -> tuple[str, ...]:
    """The values of a (multi-valued) string attribute; () where it is absent."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class Header:
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


def frame(path: Path, ds: Dataset, index: int, header: Header) -> Frame | str:
    """Frame `index` of `ds` from its gathered `header`, or why its geometry is unusable."""
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
        instance_number=optional_int(ds.get("InstanceNumber")),
        image_type=header.image_type,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        gantry_tilt=_optional_float(header.gantry_tilt),
    )


def frames_of(path: Path, ds: Dataset) -> list[Frame] | str:
    """The frames of one image instance (header read without pixel data), or why it has none
    usable (a specific reason: 'missing ImagePositionPatient', 'not an image (SOP class ...)')."""
    # Imported here, not at the top: multiframe imports Frame and its builder from here.
    from agent.inference.multiframe import multi_frames

    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        return f"not an image (SOP class {UID(sop_class).name if sop_class else 'missing'})"
    rows, columns = optional_int(ds.get("Rows")), optional_int(ds.get("Columns"))
    if rows is None or columns is None or rows <= 0 or columns <= 0:
        return "missing or invalid Rows/Columns"
    samples = optional_int(ds.get("SamplesPerPixel"))
    if samples not in (None, 1):
        return f"not a grayscale image (SamplesPerPixel {samples})"
    if sop_class in MULTI_FRAME_SOP_CLASSES:
        return multi_frames(path, ds)
    count = optional_int(ds.get("NumberOfFrames"))
    if count not in (None, 1):
        return f"NumberOfFrames {count} in a single-frame SOP class"
    key = (key_item(keyword, ds.get(keyword)) for keyword in _SINGLE_FRAME_KEYS)
    header = Header(
        position=ds.get("ImagePositionPatient"),
        orientation=ds.get("ImageOrientationPatient"),
        pixel_spacing=ds.get("PixelSpacing"),
        thickness=ds.get("SliceThickness"),
        slope=ds.get("RescaleSlope"),
        intercept=ds.get("RescaleIntercept"),
        stack_key=tuple(item for item in key if item is not None),
        image_type=strings(ds.get("ImageType")),
        gantry_tilt=ds.get("GantryDetectorTilt"),
    )
    got = frame(path, ds, 0, header)
    return got if isinstance(got, str) else [got]
