"""build_seg on a synthetic series and on real CT slices: references, segments, pixels, validity."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from agent.dicom.codes import ARTIFICIAL_INTELLIGENCE, PROCESSING_ALGORITHM
from agent.dicom.uids import OutputUids, output_uids
from agent.domain import ModelIdentity
from agent.encode.equipment import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from agent.encode.seg import build_seg, tracking_uid
from agent.errors import PermanentError
from tests.encode import (
    DISCLAIMER,
    SEGMENTS,
    SYNTHETIC_SIZE,
    model,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.data import dicom_files, shared_data
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.pixelmed import assert_seg_valid


@dataclass(frozen=True)
class Built:
    headers: list[Dataset]
    masks: np.ndarray
    model: ModelIdentity
    uids: OutputUids
    path: Path


def _build(headers: list[Dataset], masks: np.ndarray, out: Path) -> Built:
    identity = model()
    uids = output_uids(headers[0].StudyInstanceUID, [ds.SOPInstanceUID for ds in headers], identity)
    seg = build_seg(
        headers, masks, SEGMENTS, identity, uids, instance_number=1, disclaimer=DISCLAIMER
    )
    seg.save_as(out, enforce_file_format=True)
    return Built(headers, masks, identity, uids, out)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Built:
    folder = tmp_path_factory.mktemp("synthetic-seg")
    headers = read_headers(write_synthetic_ct(folder / "ct"))
    masks = synthetic_masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    return _build(headers, masks, folder / "seg.dcm")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Built:
    headers = read_headers(dicom_files(shared_data("dcmqi", "ct-3slice")))
    masks = synthetic_masks(len(headers), int(headers[0].Rows), int(headers[0].Columns))
    return _build(headers, masks, tmp_path_factory.mktemp("real-seg") / "seg.dcm")


@pytest.fixture(params=["synthetic", "real"])
def built(request: pytest.FixtureRequest) -> Built:
    result: Built = request.getfixturevalue(request.param)
    return result


def test_source_headers_have_no_pixel_data(built: Built) -> None:
    assert all("PixelData" not in ds for ds in built.headers)


def test_seg_is_binary_in_source_study_with_new_series(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    source = built.headers[0]
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID == built.uids.seg_series != source.SeriesInstanceUID
    assert seg.SOPInstanceUID == built.uids.seg_instance
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.PatientName == source.PatientName
    assert seg.SeriesNumber == 9901
    assert seg.InstanceNumber == 1
    assert seg.Modality == "SEG"


def test_seg_references_every_source_instance(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    referenced = {(study, series, sop) for study, series, sop in seg.get_source_image_uids()}
    expected = {
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in built.headers
    }
    assert referenced == expected
    series_refs = seg.ReferencedSeriesSequence
    assert [item.SeriesInstanceUID for item in series_refs] == [built.headers[0].SeriesInstanceUID]


def test_seg_segments_match_specs(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    assert seg.get_segment_numbers() == [spec.number for spec in SEGMENTS]
    for spec in SEGMENTS:
        description = seg.get_segment_description(spec.number)
        assert description.segment_label == spec.label
        assert description.segmented_property_category.value == spec.category.value
        assert description.segmented_property_category.scheme_designator == spec.category.scheme
        assert description.segmented_property_type.value == spec.type.value
        assert description.segmented_property_type.scheme_designator == spec.type.scheme
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.algorithm_identification is not None
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == built.model.name
        assert algorithm.AlgorithmVersion == built.model.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == (
            ARTIFICIAL_INTELLIGENCE.value,
            ARTIFICIAL_INTELLIGENCE.scheme,
        )
        assert description.tracking_id == spec.tracking_id
        assert description.tracking_uid == tracking_uid(built.uids, spec.number)


def test_seg_pixels_round_trip(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in built.headers],
        segment_numbers=[spec.number for spec in SEGMENTS],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(built.masks, 0, -1))


def test_seg_omits_empty_frames(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    non_empty = int(built.masks.any(axis=(2, 3)).sum())
    assert seg.NumberOfFrames == non_empty
    # Segment 3 is empty everywhere: it is described but has no frames.
    frame_segments = {
        int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert frame_segments == {1, 2}
    assert len(seg.SegmentSequence) == 3


def test_seg_says_it_is_ai_and_research_only(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    assert len(seg.SeriesDescription) <= 64
    assert seg.SeriesDescription.startswith(f"AI {built.model.name} SEG")
    assert "not for diagnosis" in seg.SeriesDescription
    assert seg.ImageComments == DISCLAIMER
    assert "research" in seg.ContentDescription
    assert seg.Manufacturer == "pacs-agent"


def test_seg_contributing_equipment_follows_ihe_air(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    items = [
        item
        for item in seg.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]
    assert len(items) == 1
    item = items[0]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert purpose.CodingSchemeDesignator == "99IHE"
    assert purpose.CodeMeaning == "Processing Algorithm"
    assert item.Manufacturer == built.model.manufacturer
    assert item.ManufacturerModelName == built.model.name
    assert item.SoftwareVersions == built.model.version
    assert item.DeviceUID == built.model.device_uid
    assert item.ContributionDateTime


def test_seg_dates_derive_from_source(built: Built) -> None:
    seg = hd.seg.segread(built.path)
    latest = max(str(ds.ContentDate) + str(ds.ContentTime) for ds in built.headers)
    assert str(seg.ContentDate) + str(seg.ContentTime) == latest
    assert seg.InstanceCreationDate == seg.ContentDate
    assert seg.InstanceCreationTime == seg.ContentTime
    # The series holds every revision, each with its own dates: no series-level date.
    assert "SeriesDate" not in seg and "SeriesTime" not in seg


def test_seg_passes_dciodvfy(built: Built) -> None:
    assert_dciodvfy_clean(built.path)


def test_seg_passes_pixelmed(built: Built) -> None:
    assert_seg_valid(built.path)


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        (None, None, ""),
        ("Laterality", "L", "L"),
        ("ImageLaterality", "B", "B"),
        ("Laterality", "X", ""),
    ],
)
def test_seg_states_the_sources_laterality_as_image_laterality(
    synthetic: Built, tmp_path: Path, keyword: str | None, value: str | None, expected: str
) -> None:
    # PS3.3 C.7.3.1: series Laterality (2C) is required for a paired body part unless Image
    # Laterality is sent. The SEG sends Image Laterality (C.7.6.1, type 3), the source's or
    # empty (unknown), and so no series Laterality.
    headers = [copy.deepcopy(ds) for ds in synthetic.headers]
    for ds in headers:
        if keyword is not None:
            setattr(ds, keyword, value)
    out = _build(headers, synthetic.masks, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(out.path, stop_before_pixels=True)
    assert "ImageLaterality" in seg and (seg.ImageLaterality or "") == expected
    assert "Laterality" not in seg
    assert_dciodvfy_clean(out.path)
    assert_seg_valid(out.path)


def test_seg_file_meta_names_pacs_agent(synthetic: Built) -> None:
    meta = pydicom.dcmread(synthetic.path, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    # PS3.10 7.1: a UID, and a version name of at most 16 characters (SH).
    assert pydicom.uid.UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert 1 <= len(IMPLEMENTATION_VERSION_NAME) <= 16


def test_build_seg_leaves_source_headers_unchanged(real: Built) -> None:
    # highdicom_source works on a copy; the real CT has a caret-less name and an empty charset.
    again = read_headers(dicom_files(shared_data("dcmqi", "ct-3slice")))
    for before, after in zip(again, real.headers, strict=True):
        assert before == after


def test_all_empty_masks_still_give_a_valid_seg(synthetic: Built, tmp_path: Path) -> None:
    masks = np.zeros_like(synthetic.masks)
    out = _build(synthetic.headers, masks, tmp_path / "empty.dcm")
    seg = hd.seg.segread(out.path)
    # One empty frame per segment, over the first slice, instead of segments x slices frames.
    assert seg.NumberOfFrames == len(SEGMENTS)
    assert not seg.pixel_array.any()
    assert seg.get_segment_numbers() == [spec.number for spec in SEGMENTS]
    assert_dciodvfy_clean(out.path)
    assert_seg_valid(out.path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m[:2], "masks for"),
        (lambda m: m[:, :-1], "masks have 9 slices"),
        (lambda m: m[:, :, :-1], "masks slices are"),
        (lambda m: m.astype(np.uint8), "must be bool"),
    ],
)
def test_build_seg_rejects_bad_masks(synthetic: Built, change: object, message: str) -> None:
    masks = change(synthetic.masks)  # type: ignore[operator]
    with pytest.raises(PermanentError, match=message) as error:
        build_seg(
            synthetic.headers,
            masks,
            SEGMENTS,
            synthetic.model,
            synthetic.uids,
            instance_number=1,
            disclaimer="x",
        )
    assert str(synthetic.headers[0].PatientName) not in str(error.value)
    assert synthetic.headers[0].PatientID not in str(error.value)


def test_seg_carries_the_revision_as_instance_number(synthetic: Built) -> None:
    def build(revision: int) -> hd.seg.Segmentation:
        return build_seg(
            synthetic.headers,
            synthetic.masks,
            SEGMENTS,
            synthetic.model,
            synthetic.uids,
            instance_number=revision,
            disclaimer=DISCLAIMER,
        )

    assert build(3).InstanceNumber == 3
    with pytest.raises(PermanentError, match="instance number"):
        build(0)
