"""Map mask slices to source frames, and check that each SEG frame lies on its source frame.

A mapping `frames[z] = (i, k)` says that slice z of the masks is the 0-based frame k of
`source[i]` (see seg.build_seg); the checks here keep a SEG that is valid but puts a mask on
another slice's image from ever being written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydicom import Dataset

from agent.errors import PermanentError

# A SEG frame and the source frame it references must lie in the same plane; DS values
# (PS3.5 6.2: 16 characters) keep positions to far better than this.
_POSITION_TOLERANCE_MM = 1e-3


def is_multiframe(ds: Dataset) -> bool:
    """Whether `ds` is an Enhanced or Legacy Converted Enhanced (multi-frame) image."""
    # Enhanced and Legacy Converted Enhanced images keep their geometry in functional groups
    # (PS3.3 C.7.6.16); a frame count alone does not tell.
    return "PerFrameFunctionalGroupsSequence" in ds


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames: 1 if absent, 0 if not a number (then no frame index is in range)."""
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 0


def frame_mapping(
    source: Sequence[Dataset], frames: Sequence[tuple[int, int]] | None, slices: int
) -> list[tuple[int, int]]:
    """`frames` checked against `source` and the masks, or the single-frame default."""
    if not source:
        raise PermanentError("no source images to build a SEG from")
    multiframe = [i for i, ds in enumerate(source) if is_multiframe(ds)]
    if multiframe and len(source) > 1:
        # highdicom derives a SEG from one multi-frame image or from single-frame images.
        raise PermanentError(
            f"a SEG needs one multi-frame source image or single-frame ones; got"
            f" {len(source)} source images, {len(multiframe)} of them multi-frame"
        )
    if frames is None:
        if multiframe:
            raise PermanentError("a multi-frame source image needs an explicit frame mapping")
        frames = [(z, 0) for z in range(len(source))]
    mapping = [(int(i), int(k)) for i, k in frames]
    if len(mapping) != slices:
        raise PermanentError(
            f"masks have {slices} slices, the frame mapping (or the source) {len(mapping)}"
        )
    for z, (i, k) in enumerate(mapping):
        if not 0 <= i < len(source):
            raise PermanentError(f"slice {z} maps to source {i} of {len(source)}")
        count = number_of_frames(source[i]) if is_multiframe(source[i]) else 1
        if not 0 <= k < count:
            raise PermanentError(f"slice {z} maps to frame {k + 1} of source {i} ({count} frames)")
    if len(set(mapping)) != len(mapping):
        raise PermanentError("the frame mapping names a source frame twice")
    unused = sorted(set(range(len(source))) - {i for i, _ in mapping})
    if unused:
        # The SEG and the SR would reference images the result was not derived from.
        raise PermanentError(f"source images {unused} are not a slice of the masks")
    return mapping


def check_slice_order(source: Sequence[Dataset], mapping: Sequence[tuple[int, int]]) -> None:
    """PermanentError unless the mapped frames ascend along the slice normal, as the masks do.

    A mapping in another order (reversed, or in stored frame order) would put each mask on
    another slice's image: a SEG that is valid, and wrong.
    """
    planes = [frame_plane(source, i, k) for i, k in mapping]
    _, cosines = planes[0]
    # PS3.3 C.7.6.2.1.1: the normal is the cross product of the row and column directions.
    normal = np.cross(cosines[:3], cosines[3:])
    distances = [float(np.dot(normal, position)) for position, _ in planes]
    for z in range(1, len(distances)):
        if distances[z] - distances[z - 1] < _POSITION_TOLERANCE_MM:
            i, k = mapping[z]
            raise PermanentError(
                f"slice {z} of the masks (source {i}, frame {k + 1}) is not above slice"
                f" {z - 1} along the slice normal: the frame mapping must follow the"
                " volume's slice order"
            )


def frame_plane(source: Sequence[Dataset], index: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image Position and Orientation (Patient) of frame k of source `index`."""
    ds = source[index]
    position = orientation = None
    if is_multiframe(ds):
        # Per-frame functional groups override shared ones (PS3.3 C.7.6.16).
        groups = [
            ds.PerFrameFunctionalGroupsSequence[k],
            *ds.get("SharedFunctionalGroupsSequence", []),
        ]
        for group in reversed(groups):
            if "PlanePositionSequence" in group:
                position = group.PlanePositionSequence[0].get("ImagePositionPatient")
            if "PlaneOrientationSequence" in group:
                orientation = group.PlaneOrientationSequence[0].get("ImageOrientationPatient")
    else:
        position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    position_mm, cosines = _floats(position, 3), _floats(orientation, 6)
    if position_mm is None or cosines is None:
        raise PermanentError(
            f"source {index} frame {k + 1} has no valid Image Position/Orientation (Patient)"
        )
    return position_mm, cosines


def verify_frames(
    seg: Dataset, source: Sequence[Dataset], frames: Sequence[tuple[int, int]]
) -> None:
    """PermanentError unless every SEG frame lies on the source frame it was derived from.

    Each frame's Plane Position (PS3.3 C.7.6.16.2.3) must equal, within 1e-3 mm, the
    position of each source frame its Derivation Image Sequence references (C.7.6.16.2.6),
    and that source frame must be one of `frames` (as for `seg.build_seg`).
    """
    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(source)}
    mapped = set(frames)
    for number, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        problem = _frame_problem(item, source, by_uid, mapped)
        if problem:
            raise PermanentError(f"SEG frame {number} does not match its source image: {problem}")


def _frame_problem(
    item: Dataset,
    source: Sequence[Dataset],
    by_uid: dict[str, int],
    mapped: set[tuple[int, int]],
) -> str | None:
    """Why one Per-Frame Functional Groups item does not match its source frame, or None."""
    references = [
        reference
        for derivation in item.get("DerivationImageSequence", [])
        for reference in derivation.get("SourceImageSequence", [])
    ]
    if not references:
        return "it references no source image"
    plane = item.get("PlanePositionSequence") or [Dataset()]
    position = _floats(plane[0].get("ImagePositionPatient"), 3)
    if position is None:
        return "it has no valid plane position"
    for reference in references:
        index = by_uid.get(str(reference.get("ReferencedSOPInstanceUID", "")))
        if index is None:
            return "it references an instance that is not a source image"
        for k in _referenced_frames(reference, source[index]):
            if (index, k) not in mapped:
                return f"source {index} frame {k + 1} is not a slice of the masks"
            expected, _ = frame_plane(source, index, k)
            gap = float(np.abs(position - expected).max())
            if not gap <= _POSITION_TOLERANCE_MM:
                return f"source {index} frame {k + 1} lies {gap:.3g} mm away"
    return None


def _referenced_frames(reference: Dataset, source: Dataset) -> list[int]:
    """0-based frames of `source` that a Source Image Sequence item references."""
    numbers = reference.get("ReferencedFrameNumber")
    if numbers is None:
        # No frame number: every frame (PS3.3 Table 10-3, Image SOP Instance Reference).
        return [0] if not is_multiframe(source) else list(range(number_of_frames(source)))
    values = (
        numbers if isinstance(numbers, Sequence) and not isinstance(numbers, str) else [numbers]
    )
    return [int(v) - 1 for v in values]


def _floats(value: object, count: int) -> np.ndarray | None:
    """`value` (a DS multi-value) as `count` finite floats, or None."""
    if not isinstance(value, Iterable) or isinstance(value, str):
        return None
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) and np.isfinite(array).all() else None
