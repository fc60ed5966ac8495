"""LABELMAP SEG: one frame per slice of segment numbers, valid, and its SR references it."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import UID

from agent.errors import PermanentError
from tests.encode import (
    SEGMENTS,
    SYNTHETIC_SIZE,
    Encoded,
    encode,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.data import dicom_files, shared_data
from tests.support.dciodvfy import assert_dciodvfy_clean

LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def _saved(encoded: Encoded, folder: Path) -> Path:
    path = folder / "seg.dcm"
    encoded.seg.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_headers(write_synthetic_ct(tmp_path_factory.mktemp("labelmap") / "ct"))


@pytest.fixture(scope="module")
def masks(headers: list[Dataset]) -> np.ndarray:
    return synthetic_masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)


def test_labelmap_seg_has_one_frame_of_segment_numbers_per_slice(
    headers: list[Dataset], masks: np.ndarray, tmp_path: Path
) -> None:
    encoded = encode(headers, masks, 1.0, seg_type="labelmap")
    seg = pydicom.dcmread(_saved(encoded, tmp_path))
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION
    assert seg.SegmentationType == "LABELMAP"
    assert seg.SOPInstanceUID == encoded.uids.seg_instance
    # One frame per slice with any segment, not one per segment and slice.
    assert seg.NumberOfFrames == int(masks.any(axis=(0, 2, 3)).sum())
    # highdicom describes pixel value 0 as segment 0, "Background" (PS3.3 C.8.20.2).
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    assert numbers == [0, *(s.number for s in SEGMENTS)]
    assert seg.SegmentSequence[0].SegmentLabel == "Background"
    read = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = read.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in headers],
        segment_numbers=[spec.number for spec in SEGMENTS],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(masks, 0, -1))


def test_labelmap_and_binary_seg_of_one_result_are_other_instances(
    headers: list[Dataset], masks: np.ndarray
) -> None:
    binary = encode(headers, masks, 1.0)
    labelmap = encode(headers, masks, 1.0, seg_type="labelmap")
    assert binary.seg.SOPClassUID == SEGMENTATION
    assert labelmap.seg.SOPInstanceUID != binary.seg.SOPInstanceUID
    assert labelmap.sr.SOPInstanceUID != binary.sr.SOPInstanceUID
    assert labelmap.seg.SeriesInstanceUID == binary.seg.SeriesInstanceUID


def test_the_sr_of_a_labelmap_seg_references_it(headers: list[Dataset], masks: np.ndarray) -> None:
    encoded = encode(headers, masks, 1.0, seg_type="labelmap")
    references = [
        ref
        for item in encoded.sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
        if ref.ReferencedSOPClassUID == LABEL_MAP_SEGMENTATION
    ]
    assert [r.ReferencedSOPInstanceUID for r in references] == [encoded.seg.SOPInstanceUID]


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_labelmap_seg_passes_dciodvfy(
    source: str, headers: list[Dataset], masks: np.ndarray, tmp_path: Path
) -> None:
    if source == "real":
        headers = read_headers(dicom_files(shared_data("dcmqi", "ct-3slice")))
        masks = synthetic_masks(len(headers), int(headers[0].Rows), int(headers[0].Columns))
    assert_dciodvfy_clean(_saved(encode(headers, masks, 1.0, seg_type="labelmap"), tmp_path))


def test_overlapping_segments_cannot_be_a_labelmap(
    headers: list[Dataset], masks: np.ndarray
) -> None:
    overlapping = masks.copy()
    overlapping[2] = overlapping[0]
    with pytest.raises(PermanentError, match="cannot build a SEG"):
        encode(headers, overlapping, 1.0, seg_type="labelmap")
    # The same masks are a valid BINARY SEG.
    assert UID(encode(headers, overlapping, 1.0).seg.SOPClassUID) == SEGMENTATION
