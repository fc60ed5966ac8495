"""representative_points: one pixel in each non-empty segment, on its largest cross-section."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from agent.encode.sr_points import representative_points
from tests.encode import SEGMENTS, SYNTHETIC_SIZE, encode, read_headers, write_synthetic_ct


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_headers(write_synthetic_ct(tmp_path_factory.mktemp("points") / "ct"))


def _masks(slices: int) -> np.ndarray:
    masks = np.zeros((len(SEGMENTS), slices, SYNTHETIC_SIZE, SYNTHETIC_SIZE), dtype=bool)
    masks[0, 2, 10:12, 10:12] = True
    masks[0, 5, 20:40, 20:40] = True  # the largest cross-section
    masks[0, 6, 20:30, 20:30] = True
    # A ring: its centroid is outside it, the point must not be.
    masks[1, 3, 30:50, 30:50] = True
    masks[1, 3, 34:46, 34:46] = False
    return masks


def test_point_is_in_the_segment_on_its_largest_cross_section(headers: list[Dataset]) -> None:
    masks = _masks(len(headers))
    seg = encode(headers, masks, 1.0).seg
    points = representative_points(seg)
    assert sorted(points) == [1, 2]  # segment 3 is empty
    by_uid = {str(ds.SOPInstanceUID): z for z, ds in enumerate(headers)}
    for number, point in points.items():
        z = by_uid[point.sop_instance_uid]
        assert point.frame_number is None
        assert masks[number - 1, z, point.row, point.column]
        sizes = masks[number - 1].sum(axis=(1, 2))
        assert sizes[z] == sizes.max()
    assert (points[1].row, points[1].column) == (29, 29)  # nearest the centroid (29.5, 29.5)


def test_labelmap_seg_gives_the_binary_segs_points(headers: list[Dataset]) -> None:
    masks = _masks(len(headers))
    binary = encode(headers, masks, 1.0).seg
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for index in range(len(SEGMENTS)):
        labels[masks[index]] = index + 1
    labelmap = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=[
            hd.seg.SegmentDescription.from_dataset(item) for item in binary.SegmentSequence
        ],
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert representative_points(labelmap) == representative_points(binary)


def test_a_seg_of_one_segment(headers: list[Dataset]) -> None:
    """highdicom then states the segment once, in the shared functional groups (PS3.3
    C.7.6.16), not per frame: the points were read per frame only, and the export failed."""
    masks = _masks(len(headers))[:1]
    seg = encode(headers, masks, 1.0, segments=SEGMENTS[:1]).seg
    assert "SegmentIdentificationSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
    points = representative_points(seg)
    assert sorted(points) == [1]
