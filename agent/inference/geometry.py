"""Gate the frames of one series into stacks that each give a correct volume, or say why none can.

Patient coordinates are LPS (PS3.3 C.7.6.2.1.1): x to the patient's left, y posterior, z to the
head. Positions are compared along the slice normal, the only direction slices are stacked in;
SliceThickness never decides the spacing (overlapping reconstructions are thicker than their
spacing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from statistics import median

import numpy as np

from agent.inference.frames import Frame
from agent.inference.pixels import same_pixels
from agent.inference.stack_keys import (
    Candidate,
    along,
    join_words,
    natural_order,
    split_by_key,
)

# A normal within this angle of a patient axis names the stack after that axis (sagittal: x,
# coronal: y, axial: z); further off it is "oblique". 10 degrees keeps a tilted-gantry head CT
# axial; whether a model takes a stack is decided by its own rules, not here.
ORIENTATION_TOLERANCE_DEG = 10.0
# The step between slice positions may lean at most this far from the slice normal. Beyond it
# the volume is sheared (gantry tilt reconstructed onto untilted planes) and stacking the slices
# on a rectilinear grid would misplace anatomy by tan(angle) per mm of scan length.
TILT_TOLERANCE_DEG = 0.5
MIN_FRAMES = 2
# Frames of one stack agree on direction cosines and pixel spacing to this precision; real
# series repeat the same strings, and 1e-3 (0.06 degrees) absorbs rounding to few digits.
_COSINE_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 1e-3  # relative

PixelComparer = Callable[[Frame, Frame], bool]


@dataclass(frozen=True)
class Stack:
    """Frames that form one volume, in slice order, with their geometry and what the gate fixed."""

    frames: tuple[Frame, ...]  # sorted along the slice normal, ascending
    spacing: tuple[float, float, float]  # (z, y, x) mm; z from positions, not SliceThickness
    normal: tuple[float, float, float]
    orientation: str  # "axial" | "coronal" | "sagittal" | "oblique", ORIENTATION_TOLERANCE_DEG
    notes: tuple[str, ...]  # what the gate fixed or chose, free of patient identity

    @property
    def thickness(self) -> float | None:
        """The median SliceThickness of the frames that state one, else None."""
        values = [f.thickness for f in self.frames if f.thickness is not None]
        return float(median(values)) if values else None

    @property
    def paths(self) -> tuple[Path, ...]:
        """The distinct files of the stack, in the order of their first frame."""
        return tuple(dict.fromkeys(f.path for f in self.frames))


@dataclass(frozen=True)
class Rejected:
    """Why the frames of a series give no usable stack."""

    reason: str


def mm(value: float) -> str:
    """A length in mm for a note or reason, to 0.01 mm."""
    return f"{round(value, 2):g}"


def plural(count: int, word: str) -> str:
    """`count` and `word`, with an s unless count is 1."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _orientation_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    if angle > ORIENTATION_TOLERANCE_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _units(frames: Sequence[Frame]) -> str:
    """The word for the frames in a note: "image" if each is a single-frame instance."""
    return "image" if all(f.index == 0 for f in frames) else "frame"


def _drop_repeats(frames: Sequence[Frame]) -> tuple[list[Frame], list[str]] | Rejected:
    """Keep one copy of each frame of an instance that arrived more than once."""
    kept: dict[tuple[str, int], Frame] = {}
    unnamed: list[Frame] = []
    repeats = conflicts = 0
    for frame in sorted(frames, key=lambda f: (str(f.path), f.index)):
        if not frame.sop_uid:
            unnamed.append(frame)
            continue
        first = kept.setdefault((frame.sop_uid, frame.index), frame)
        if first is frame:
            continue
        if replace(frame, path=first.path) == first:
            repeats += 1
        else:
            conflicts += 1
    if conflicts:
        return Rejected(
            f"{plural(conflicts, 'SOP instance')} received twice with different headers"
        )
    notes = []
    if repeats:
        notes.append(
            f"dropped {repeats} exact {'duplicate' if repeats == 1 else 'duplicates'} "
            "(one SOP instance received twice)"
        )
    return [*kept.values(), *unnamed], notes


def _close_orientation(a: Frame, b: Frame) -> bool:
    return all(
        abs(x - y) <= _COSINE_TOLERANCE for x, y in zip(a.orientation, b.orientation, strict=True)
    )


def _close_spacing(a: Frame, b: Frame) -> bool:
    return all(
        abs(x - y) <= _SPACING_TOLERANCE * max(x, y)
        for x, y in zip(a.pixel_spacing, b.pixel_spacing, strict=True)
    )


def _differences(a: Frame, b: Frame) -> list[str]:
    """The geometry attributes in which two frames differ too much to share a stack."""
    checks = (
        ("orientation", _close_orientation(a, b)),
        ("size", a.shape == b.shape),
        ("pixel spacing", _close_spacing(a, b)),
        # Positions in different frames of reference cannot be compared (PS3.3 C.7.4.1.1.1).
        ("frame of reference", a.frame_of_reference_uid == b.frame_of_reference_uid),
    )
    return [name for name, same in checks if not same]


def _geometry_groups(frames: Sequence[Frame]) -> list[list[Frame]]:
    """Frames grouped by orientation, size, pixel spacing and frame of reference, largest first."""
    groups: list[list[Frame]] = []
    for frame in frames:
        group = next((g for g in groups if not _differences(g[0], frame)), None)
        if group is None:
            groups.append([frame])
        else:
            group.append(frame)
    return sorted(groups, key=lambda g: -len(g))


def _order_note(frames: Sequence[Frame]) -> str | None:
    """Say when slice order differs from the order the frames were numbered or stored in."""
    if len({f.sop_uid for f in frames}) == 1:
        keys: list[tuple[int, int]] = [(0, f.index) for f in frames]
        what = f"sorted {len(frames)} frames stored"
        reversed_, unsorted = f"{what} in reverse order", f"{what} out of order"
    elif all(f.instance_number is not None for f in frames):
        keys = [(f.instance_number or 0, f.index) for f in frames]
        what = f"sorted {len(frames)} slices whose instance numbers were"
        reversed_, unsorted = f"{what} reversed", f"{what} out of order"
    else:
        return None
    pairs = list(pairwise(keys))
    if all(a < b for a, b in pairs):
        return None
    return reversed_ if all(a > b for a, b in pairs) else unsorted


def _build(frames: Sequence[Frame], compare: PixelComparer) -> Stack | Rejected:
    """Sort the frames of one candidate along its normal and check that they form a volume."""
    # Imported here, not at the top: positions imports Rejected and PixelComparer from here.
    from agent.inference.positions import dedupe_positions, shear, slice_spacing

    normal = frames[0].normal
    ordered = sorted(frames, key=lambda f: (along(f, normal), str(f.path), f.index))
    got = dedupe_positions(ordered, normal, compare)
    if isinstance(got, Rejected):
        return got
    kept, notes = got
    if len(kept) < MIN_FRAMES:
        return Rejected(f"fewer than {MIN_FRAMES} slice positions ({len(kept)})")
    sheared = shear(kept, normal)
    if sheared is not None:
        return sheared
    spacing = slice_spacing(kept, normal)
    if isinstance(spacing, Rejected):
        return spacing
    order = _order_note(kept)
    if order is not None:
        notes.append(order)
    tilts = sorted({abs(f.gantry_tilt) for f in kept if f.gantry_tilt is not None})
    if tilts and tilts[-1] > TILT_TOLERANCE_DEG:
        # The positions are the geometry (PS3.3 C.7.6.2.1.1); the tilt attribute only says how
        # the scanner was set, and here the planes were reconstructed along their own normal.
        notes.append(
            f"GantryDetectorTilt {mm(tilts[-1])} degrees, but the slice positions step along "
            "the slice normal: volume built from the positions"
        )
    row_spacing, column_spacing = kept[0].pixel_spacing
    return Stack(
        frames=tuple(kept),
        spacing=(spacing, row_spacing, column_spacing),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        orientation=_orientation_name(normal),
        notes=tuple(notes),
    )


def _describe(candidate: Candidate, candidates: Sequence[Candidate]) -> str:
    """What tells one candidate apart from the others of its series."""
    common = set(candidate.key).intersection(*(c.key for c in candidates))
    parts = [item for item in candidate.key if item not in common]
    if len({c.group for c in candidates}) > 1:
        first = candidate.frames[0]
        rows, columns = first.shape
        parts.insert(0, f"{_orientation_name(first.normal)} {rows}x{columns}")
    return ", ".join(parts) or f"{plural(len(candidate.frames), 'frame')}"


def gate(
    frames: Sequence[Frame], *, compare: PixelComparer = same_pixels
) -> list[Stack] | Rejected:
    """All usable stacks of one series (largest first), or the specific reason there is none.

    `compare` tells whether two frames at one position hold the same pixels; by default it
    reads them from their files (pixels.same_pixels), only for frames that share a position.
    """
    if not frames:
        return Rejected("no image frames")
    got = _drop_repeats(frames)
    if isinstance(got, Rejected):
        return got
    unique, notes = got
    # A localizer is a projection, never a slice of a volume (PS3.3 C.8.2.1.1.1, value 3).
    localizers = [f for f in unique if "LOCALIZER" in f.image_type]
    if localizers:
        notes.append(f"dropped {plural(len(localizers), 'localizer ' + _units(localizers))}")
    rest = [f for f in unique if "LOCALIZER" not in f.image_type]
    groups = _geometry_groups(rest)
    if not groups or len(groups[0]) < MIN_FRAMES:
        besides = " besides localizers" if localizers else ""
        return Rejected(
            f"no {MIN_FRAMES} frames{besides} share one orientation, size and pixel spacing "
            f"({plural(len(rest), 'frame')})"
        )
    candidates: list[Candidate] = []
    for index, group in enumerate(groups):
        if len(group) >= MIN_FRAMES:
            candidates += split_by_key(group, index)
            continue
        other = join_words(_differences(group[0], groups[0][0]))
        notes.append(f"dropped {plural(len(group), _units(group))} of another {other}")
    built = sorted(
        ((c, _build(c.frames, compare)) for c in candidates), key=lambda cb: -len(cb[0].frames)
    )
    largest = max((len(c.frames) for c, s in built if isinstance(s, Stack)), default=0)
    stacks: list[tuple[Candidate, Stack]] = []
    for candidate, result in built:
        if isinstance(result, Stack):
            stacks.append((candidate, result))
            continue
        if len(candidates) == 1:
            return result
        label = f"stack {_describe(candidate, candidates)}"
        if len(candidate.frames) >= largest:
            # A stack at least as large as every good one is broken: the series is.
            return Rejected(f"{label}: {result.reason}")
        notes.append(f"dropped {label}: {result.reason}")
    stacks.sort(key=lambda cs: (-len(cs[1].frames), cs[0].group, natural_order(cs[0].key)))
    kept = [c for c, _ in stacks]
    return [
        replace(
            stack,
            notes=(
                *(
                    [f"stack {i} of {len(stacks)} ({_describe(c, kept)})"]
                    if len(stacks) > 1
                    else []
                ),
                *notes,
                *c.notes,
                *stack.notes,
            ),
        )
        for i, (c, stack) in enumerate(stacks, start=1)
    ]
