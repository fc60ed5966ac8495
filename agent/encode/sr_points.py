"""Find, for each non-empty segment of a SEG, one source image pixel that lies in the segment."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue


@dataclass(frozen=True)
class RepresentativePoint:
    """A pixel of a segment on the source image (and frame) its SEG frame was derived from.

    `column` and `row` are 0-based pixel indices; the SR's image coordinates are their centre
    (PS3.3 C.18.6.1.1: the top left corner of the top left pixel is 0.0\\0.0).
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    column: int
    row: int


def representative_points(seg: hd.seg.Segmentation) -> dict[int, RepresentativePoint]:
    """One point per segment with voxels, keyed by segment number; empty segments have none.

    The point is on the segment's largest cross-section (the SEG frame with most of its
    pixels; the first such frame on ties): the segment's pixel nearest to the centroid of
    that cross-section, so that it lies in the segment even where the segment is not convex.
    BINARY frames belong to one segment each (PS3.3 C.8.20.3 Segment Identification);
    LABELMAP frames hold segment numbers as pixel values.
    """
    per_frame = seg.PerFrameFunctionalGroupsSequence
    shared = seg.SharedFunctionalGroupsSequence[0]
    labelmap = str(seg.SegmentationType) == "LABELMAP"
    best: dict[int, tuple[int, int]] = {}  # segment -> (pixels, 1-based frame number)
    for index, item in enumerate(per_frame):
        frame = np.asarray(seg.get_stored_frame(index + 1))
        if labelmap:
            counts = np.bincount(frame.ravel().astype(np.int64))
            present = {n: int(c) for n, c in enumerate(counts) if n > 0 and c > 0}
        else:
            number = _segment_number(item, shared)
            count = int(np.count_nonzero(frame))
            present = {number: count} if count else {}
        for number, count in present.items():
            if count > best.get(number, (0, 0))[0]:
                best[number] = (count, index + 1)
    points: dict[int, RepresentativePoint] = {}
    for number, (_, frame_number) in sorted(best.items()):
        source = _source_image(per_frame[frame_number - 1])
        if source is None:
            continue
        frame = np.asarray(seg.get_stored_frame(frame_number))
        rows, columns = np.nonzero(frame == number if labelmap else frame)
        distance = (rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2
        nearest = int(np.argmin(distance))  # first in raster order on ties
        points[number] = RepresentativePoint(
            sop_class_uid=source[0],
            sop_instance_uid=source[1],
            frame_number=source[2],
            column=int(columns[nearest]),
            row=int(rows[nearest]),
        )
    return points


def _segment_number(item: Dataset, shared: Dataset) -> int:
    """The segment a BINARY frame belongs to: per frame, or for every frame when the SEG has
    one segment (PS3.3 C.7.6.16: a functional group is per-frame or shared, not both)."""
    group = item if "SegmentIdentificationSequence" in item else shared
    return int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _source_image(item: Dataset) -> tuple[str, str, int | None] | None:
    """The source image, and frame for multi-frame sources, a SEG frame was derived from."""
    for derivation in item.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            frames = source.get("ReferencedFrameNumber")
            if isinstance(frames, MultiValue | list):
                frames = frames[0] if frames else None
            frame = int(frames) if frames is not None else None
            return str(source.ReferencedSOPClassUID), str(source.ReferencedSOPInstanceUID), frame
    return None
