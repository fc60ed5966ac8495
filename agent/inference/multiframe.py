"""Read the frames of an Enhanced or Legacy Converted Enhanced image from its functional groups.

Each item of the Per-frame Functional Groups Sequence is one frame; a macro absent from it is
taken from the Shared Functional Groups Sequence (PS3.3 C.7.6.16).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from agent.inference.frames import Frame, Header, frame, key_item, optional_int, strings

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
            return strings(item.get("FrameType"))
    return ()


def _multi_frame_key(groups: Dataset, shared: Dataset, dimensions: Sequence[str]) -> list[str]:
    content = _macro(groups, shared, "FrameContentSequence")
    echo = _macro(groups, shared, "MREchoSequence")
    diffusion = _macro(groups, shared, "MRDiffusionSequence")
    direction = _macro(diffusion, Dataset(), "DiffusionGradientDirectionSequence")
    key = [
        key_item("StackID", _get(content, "StackID")),
        key_item("TemporalPositionIndex", _get(content, "TemporalPositionIndex")),
        key_item("EffectiveEchoTime", _get(echo, "EffectiveEchoTime")),
        key_item("DiffusionBValue", _get(diffusion, "DiffusionBValue")),
        key_item("DiffusionGradientOrientation", _get(direction, "DiffusionGradientOrientation")),
    ]
    values = _get(content, "DimensionIndexValues")
    if values is not None and values != "":
        values = [values] if isinstance(values, int) else list(values)
        for keyword, value in zip(dimensions, values, strict=False):
            if keyword and keyword not in _SKIPPED_DIMENSIONS:
                key.append(f"{keyword} index {value}")
    frame_type = _frame_type(groups, shared)
    key.append(key_item("FrameType", frame_type or None))
    return [item for item in key if item is not None]


def multi_frames(path: Path, ds: Dataset) -> list[Frame] | str:
    count = optional_int(ds.get("NumberOfFrames"))
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
        header = Header(
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
        got = frame(path, ds, index, header)
        if isinstance(got, str):
            return f"frame {index + 1} of {count}: {got}"
        frames.append(got)
    return frames
