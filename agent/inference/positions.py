"""Check that the sorted frames of one candidate stack sit at distinct, evenly spaced positions.

Positions are compared along the slice normal (PS3.3 C.7.6.2.1.1): one frame per position, every
step along the normal on one straight line, and no gap that means missing slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent.inference.frames import Frame
from agent.inference.geometry import TILT_TOLERANCE_DEG, PixelComparer, Rejected, mm, plural
from agent.inference.stack_keys import DUPLICATE_TOLERANCE_MM, along

# A gap this many times the median spacing means missing slices.
GAP_FACTOR = 1.5
# Otherwise each gap may differ from the median by at most this fraction of it.
SPACING_TOLERANCE = 0.10


def _same_image(a: Frame, b: Frame, compare: PixelComparer) -> bool:
    return (
        all(
            abs(x - y) < DUPLICATE_TOLERANCE_MM for x, y in zip(a.position, b.position, strict=True)
        )
        and (a.slope, a.intercept) == (b.slope, b.intercept)
        and compare(a, b)
    )


def dedupe_positions(
    ordered: Sequence[Frame], normal: np.ndarray, compare: PixelComparer
) -> tuple[list[Frame], list[str]] | Rejected:
    """One frame per position: exact copies dropped, different images at one position refused."""
    kept: list[Frame] = []
    dropped = 0
    conflicts: set[int] = set()
    for frame in ordered:
        if kept and along(frame, normal) - along(kept[-1], normal) < DUPLICATE_TOLERANCE_MM:
            if _same_image(kept[-1], frame, compare):
                dropped += 1
            else:
                conflicts.add(len(kept))
            continue
        kept.append(frame)
    if conflicts:
        return Rejected(
            "duplicate slice positions with different images at "
            f"{plural(len(conflicts), 'position')}"
        )
    notes = []
    if dropped:
        notes.append(
            f"dropped {dropped} exact {'duplicate' if dropped == 1 else 'duplicates'} "
            "(another SOP instance with the same position and pixel data)"
        )
    return kept, notes


def shear(frames: Sequence[Frame], normal: np.ndarray) -> Rejected | None:
    """Refuse positions that do not step along the normal on one straight line."""
    positions = np.asarray([f.position for f in frames], dtype=np.float64)
    z = positions @ normal
    in_plane = positions - np.outer(z, normal)
    zc = z - z.mean()
    centred = in_plane - in_plane.mean(axis=0)
    # Least-squares in-plane drift per mm along the normal: tan of the tilt or shear angle.
    drift = (zc @ centred) / float(zc @ zc)
    angle = math.degrees(math.atan(float(np.linalg.norm(drift))))
    if angle > TILT_TOLERANCE_DEG:
        tilts = sorted({f.gantry_tilt for f in frames if f.gantry_tilt})
        stated = f" (GantryDetectorTilt {mm(tilts[0])})" if len(tilts) == 1 else ""
        return Rejected(
            f"gantry tilt or shear of {angle:.1f} degrees: the slice positions step off the "
            f"slice normal{stated}"
        )
    offsets = np.linalg.norm(centred - np.outer(zc, drift), axis=1)
    worst = float(offsets.max())
    if worst > 0.5 * min(frames[0].pixel_spacing):
        return Rejected(
            f"slice positions are not on one line: in-plane offsets up to {mm(worst)} mm"
        )
    return None


def slice_spacing(frames: Sequence[Frame], normal: np.ndarray) -> float | Rejected:
    """The median gap along the normal, if no slice is missing and the gaps are uniform."""
    gaps = np.diff([along(f, normal) for f in frames])
    spacing = float(np.median(gaps))
    missing = np.flatnonzero(gaps > GAP_FACTOR * spacing)
    if missing.size:
        first = int(missing[0])
        where = f"after slice {first + 1} of {len(frames)} (median spacing {mm(spacing)} mm)"
        if missing.size == 1:
            return Rejected(f"missing slices: {mm(float(gaps[first]))} mm gap {where}")
        largest = float(gaps[missing].max())
        return Rejected(
            f"missing slices: {missing.size} gaps of up to {mm(largest)} mm, the first {where}"
        )
    if float(np.abs(gaps - spacing).max()) > SPACING_TOLERANCE * spacing:
        return Rejected(
            f"non-uniform slice spacing: gaps from {mm(float(gaps.min()))} to "
            f"{mm(float(gaps.max()))} mm (median {mm(spacing)} mm)"
        )
    return spacing
