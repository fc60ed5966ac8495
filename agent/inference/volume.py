"""Load a selected stack of frames (single- or multi-frame images, any syntax) as a 3-D volume."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from agent.dicom.files import read_header
from agent.domain import FrameRef
from agent.errors import PermanentError
from agent.inference.decode import DecodeItem, decode_frames
from agent.inference.frames import Frame, frames_of
from agent.inference.geometry import Rejected, gate
from agent.logs import instance_key

log = logging.getLogger(__name__)


Vector = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Volume:
    """One stack as a (z, y, x) float32 array (Hounsfield units for CT) with its geometry.

    `sources` are the distinct instances the frames come from, headers only; slice z is frame
    `source_frames[z][1]` (0-based) of `sources[source_frames[z][0]]`, which is what a SEG
    must reference for that slice.
    """

    hu: np.ndarray  # float32, (z, y, x), z ascending along the slice normal
    spacing: tuple[float, float, float]  # (z, y, x) in mm; z from the slice positions
    frames: tuple[FrameRef, ...] = ()  # slice order, as hu[z]
    sources: tuple[Dataset, ...] = ()
    source_frames: tuple[tuple[int, int], ...] = field(default=())
    # Patient-space (LPS) directions of the array's x (along a row), y (down a column) and z
    # (slice order) axes: ImageOrientationPatient and the stack's ascending slice normal.
    axes: tuple[Vector, Vector, Vector] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def load_volume(refs: Sequence[FrameRef]) -> Volume:
    """Decode the frames of one stack, in the given (slice) order, into a Volume.

    The geometry is checked again on the headers read now, and must give exactly this stack in
    this order: the files may have changed since the series was selected, and a model must
    never see a volume whose slices are not what the SEG will say they are.
    """
    if not refs:
        raise PermanentError("no frames to load")
    paths = list(dict.fromkeys(r.path for r in refs))
    headers = {path: read_header(path) for path in paths}
    by_ref: dict[FrameRef, Frame] = {}
    for path in paths:
        got = frames_of(path, headers[path])
        if isinstance(got, str):
            raise PermanentError(f"{instance_key(path)} cannot be stacked: {got}")
        for frame in got:
            by_ref[FrameRef(frame.path, frame.index)] = frame
    missing = [r for r in refs if r not in by_ref]
    if missing:
        first = missing[0]
        raise PermanentError(f"{instance_key(first.path)} has no frame {first.index + 1}")
    frames = [by_ref[r] for r in refs]
    stacks = gate(frames)
    if isinstance(stacks, Rejected):
        raise PermanentError(f"the frames do not form a volume: {stacks.reason}")
    if len(stacks) != 1 or [FrameRef(f.path, f.index) for f in stacks[0].frames] != list(refs):
        raise PermanentError("the frames no longer form the selected stack")
    stack = stacks[0]
    hu = decode_frames(
        [DecodeItem(f.path, f.index, f.slope, f.intercept) for f in frames],
    )
    if hu.shape[1:] != frames[0].shape:
        raise PermanentError("pixel data does not match Rows/Columns")
    index = {path: i for i, path in enumerate(paths)}
    volume = Volume(
        hu=hu,
        spacing=stack.spacing,
        frames=tuple(refs),
        sources=tuple(headers[p] for p in paths),
        source_frames=tuple((index[r.path], r.index) for r in refs),
        axes=_axes(stack.frames[0].orientation, stack.normal),
    )
    log.info(
        "loaded volume %s, spacing %s mm", hu.shape, tuple(round(v, 3) for v in volume.spacing)
    )
    return volume


def _axes(
    orientation: tuple[float, float, float, float, float, float], normal: Vector
) -> tuple[Vector, Vector, Vector]:
    row, column = orientation[:3], orientation[3:]
    return (
        (float(row[0]), float(row[1]), float(row[2])),
        (float(column[0]), float(column[1]), float(column[2])),
        (float(normal[0]), float(normal[1]), float(normal[2])),
    )


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to Hounsfield units (PS3.3 C.11.1.1.2: HU = stored x slope + intercept)."""
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)
