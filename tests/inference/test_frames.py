"""frames_of and same_pixels: the geometry, pixel transform and stack key of every frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    SegmentationStorage,
)

from agent.errors import PermanentError
from agent.inference.frames import IMAGE_SOP_CLASSES, Frame, frames_of, key_keyword
from agent.inference.pixels import same_pixels
from agent.logs import instance_key
from tests.support.data import shared_data
from tests.support.series import (
    AXIAL,
    Series,
    shuffled,
    stack_specs,
    write_enhanced_ct,
    write_enhanced_mr,
    write_series,
    write_specs,
)


def header(series: Series, index: int = 0) -> tuple[Path, Dataset]:
    path = series.files[index]
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def only_frames(path: Path, ds: Dataset) -> list[Frame]:
    got = frames_of(path, ds)
    assert not isinstance(got, str), got
    return got


def test_single_frame_ct_gives_one_frame_with_its_geometry(tmp_path: Path) -> None:
    series = write_series(tmp_path, 4)
    path, ds = header(series, 1)
    (frame,) = only_frames(path, ds)
    assert frame.path == path
    assert frame.index == 0
    assert frame.sop_uid == series.sop_uids[1]
    assert frame.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert frame.position == pytest.approx((-189.0, -189.0, -1.25))
    assert frame.orientation == AXIAL
    assert frame.pixel_spacing == (6.0, 6.0)
    assert frame.shape == (64, 64)
    assert (frame.slope, frame.intercept, frame.thickness) == (1.0, -1024.0, 2.5)
    assert frame.instance_number == 2
    assert frame.frame_of_reference_uid == series.frame_uid
    assert frame.stack_key == ("AcquisitionNumber 1", "ImageType ORIGINAL\\PRIMARY\\AXIAL")
    assert frame.normal.tolist() == [0.0, 0.0, 1.0]


def test_pixel_spacing_is_row_spacing_then_column_spacing(tmp_path: Path) -> None:
    path, ds = header(write_series(tmp_path, 2))
    ds.PixelSpacing = [0.5, 0.8]  # PS3.3 10.7.1.3: between rows, then between columns
    (frame,) = only_frames(path, ds)
    assert frame.pixel_spacing == (0.5, 0.8)


def test_absent_rescale_and_thickness_are_identity_and_none(tmp_path: Path) -> None:
    path, ds = header(write_series(tmp_path, 2))
    del ds.RescaleSlope, ds.RescaleIntercept, ds.SliceThickness
    (frame,) = only_frames(path, ds)
    assert (frame.slope, frame.intercept, frame.thickness) == (1.0, 0.0, None)


def test_stack_key_names_what_tells_stacks_apart(tmp_path: Path) -> None:
    path, ds = header(write_series(tmp_path, 2))
    ds.AcquisitionNumber = 3
    ds.TemporalPositionIdentifier = 2
    ds.EchoNumbers = 1
    ds.DiffusionBValue = 1000.0
    (frame,) = only_frames(path, ds)
    assert frame.stack_key == (
        "AcquisitionNumber 3",
        "TemporalPositionIdentifier 2",
        "EchoNumbers 1",
        "DiffusionBValue 1000",
        "ImageType ORIGINAL\\PRIMARY\\AXIAL",
    )
    assert [key_keyword(k) for k in frame.stack_key][:2] == [
        "AcquisitionNumber",
        "TemporalPositionIdentifier",
    ]


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_delete("ImagePositionPatient"), "missing ImagePositionPatient"),
        (_delete("ImageOrientationPatient"), "missing ImageOrientationPatient"),
        (_delete("PixelSpacing"), "missing PixelSpacing"),
        (_set("ImagePositionPatient", [0.0, 0.0]), "invalid ImagePositionPatient (2 values, 3"),
        (_set("PixelSpacing", [0.0, 0.7]), "invalid PixelSpacing (not positive)"),
        (
            _set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
            "degenerate ImageOrientationPatient (row and column directions parallel or zero)",
        ),
        (
            _set("ImageOrientationPatient", [1, 0, 0, 0.3, 1, 0]),
            "invalid ImageOrientationPatient (not two orthogonal unit vectors)",
        ),
        (_delete("Rows"), "missing or invalid Rows/Columns"),
        (_set("SamplesPerPixel", 3), "not a grayscale image (SamplesPerPixel 3)"),
        (_set("NumberOfFrames", 2), "NumberOfFrames 2 in a single-frame SOP class"),
        (
            _set("SOPClassUID", SegmentationStorage),
            "not an image (SOP class Segmentation Storage)",
        ),
    ],
)
def test_unusable_geometry_gives_a_specific_reason(
    tmp_path: Path, change: Callable[[Dataset], None], reason: str
) -> None:
    path, ds = header(write_series(tmp_path, 2))
    change(ds)
    got = frames_of(path, ds)
    assert isinstance(got, str)
    assert got.startswith(reason)
    assert "PHANTOM" not in got


def test_image_sop_classes_cover_ct_mr_and_pet_in_every_form() -> None:
    names = {pydicom.uid.UID(uid).name for uid in IMAGE_SOP_CLASSES}
    for name in (
        "CT Image Storage",
        "Enhanced CT Image Storage",
        "Legacy Converted Enhanced CT Image Storage",
        "MR Image Storage",
        "Enhanced MR Image Storage",
        "Legacy Converted Enhanced MR Image Storage",
        "Positron Emission Tomography Image Storage",
    ):
        assert name in names


def test_legacy_converted_ct_frames_come_from_the_functional_groups() -> None:
    path = shared_data("dcmqi", "23x38x3", "multiframe", "mf.dcm")
    frames = only_frames(path, pydicom.dcmread(path, stop_before_pixels=True))
    assert [f.index for f in frames] == [0, 1, 2]
    assert {f.sop_class_uid for f in frames} == {LegacyConvertedEnhancedCTImageStorage}
    assert [f.position[2] for f in frames] == [-177.75, -175.25, -172.75]
    assert {f.position[:2] for f in frames} == {(46.4649, 5.01881)}
    assert {(f.orientation, f.pixel_spacing, f.shape, f.thickness) for f in frames} == {
        (AXIAL, (0.7, 0.7), (38, 23), 2.5)
    }
    assert {(f.slope, f.intercept) for f in frames} == {(1.0, 0.0)}
    assert {f.stack_key[0] for f in frames} == {"StackID 1"}


def test_enhanced_ct_frames_follow_the_stored_order(tmp_path: Path) -> None:
    source = write_series(tmp_path / "single", 6)
    order = shuffled(6)
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", source, order)
    frames = only_frames(path, pydicom.dcmread(path, stop_before_pixels=True))
    singles = [only_frames(*header(source, k))[0] for k in order]
    assert [f.position for f in frames] == [s.position for s in singles]
    assert {f.sop_class_uid for f in frames} == {EnhancedCTImageStorage}
    assert {(f.slope, f.intercept, f.thickness) for f in frames} == {(1.0, -1024.0, 2.5)}
    # StackID is the stack; In-Stack Position Number only orders frames within it.
    assert {f.stack_key for f in frames} == {
        ("StackID 1", "FrameType ORIGINAL\\PRIMARY\\AXIAL\\NONE")
    }


def test_per_frame_functional_groups_override_shared_ones(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path / "e.dcm", write_series(tmp_path / "s", 3), [0, 1, 2])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 1.0
    transform = Dataset()
    transform.RescaleSlope = 2
    transform.RescaleIntercept = -2048
    ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence = [measures]
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [transform]
    frames = only_frames(path, ds)
    assert [(f.pixel_spacing, f.thickness) for f in frames] == [
        ((6.0, 6.0), 2.5),
        ((0.5, 0.5), 1.0),
        ((6.0, 6.0), 2.5),
    ]
    assert [(f.slope, f.intercept) for f in frames] == [(1, -1024), (2, -2048), (1, -1024)]


def test_multi_frame_reasons_name_the_frame(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path / "e.dcm", write_series(tmp_path / "s", 3), [0, 1, 2])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    assert frames_of(path, ds) == "frame 2 of 3: missing ImagePositionPatient"
    ds.NumberOfFrames = 4
    assert frames_of(path, ds) == "PerFrameFunctionalGroupsSequence has 3 items for 4 frames"


def test_enhanced_mr_keys_stacks_and_non_spatial_dimensions(tmp_path: Path) -> None:
    path = write_enhanced_mr(tmp_path / "mr.dcm", stacks=2, frames_per_stack=3)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = only_frames(path, ds)
    assert [f.stack_key[0] for f in frames] == ["StackID 1", "StackID 2"] * 3
    # MR has no Pixel Value Transformation: stored values are the values.
    assert {(f.slope, f.intercept) for f in frames} == {(1.0, 0.0)}
    # A third dimension that is not spatial (trigger delay: cardiac phases) keys stacks too.
    extra = Dataset()
    extra.DimensionIndexPointer = 0x00209153  # Nominal Cardiac Trigger Delay Time
    extra.FunctionalGroupPointer = 0x00189118  # Cardiac Synchronization Sequence
    ds.DimensionIndexSequence.append(extra)
    for k, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = groups.FrameContentSequence[0]
        content.DimensionIndexValues = [*content.DimensionIndexValues, k % 2 + 1]
    frames = only_frames(path, ds)
    assert frames[0].stack_key[:2] == ("StackID 1", "NominalCardiacTriggerDelayTime index 1")
    assert frames[3].stack_key[:2] == ("StackID 2", "NominalCardiacTriggerDelayTime index 2")


def test_same_pixels_compares_encoded_frames(tmp_path: Path) -> None:
    specs = stack_specs(3)
    copy = [specs[0], specs[0], specs[1]]
    series = write_specs(tmp_path / "s", copy)
    a, b, c = (only_frames(*header(series, k))[0] for k in range(3))
    assert same_pixels(a, b)
    assert not same_pixels(a, c)


def test_same_pixels_decodes_when_encodings_differ(tmp_path: Path) -> None:
    specs = stack_specs(2)
    plain = write_specs(tmp_path / "plain", specs)
    rle = write_specs(tmp_path / "rle", specs, transfer_syntax=RLELossless)
    assert pydicom.dcmread(rle.files[0]).file_meta.TransferSyntaxUID == RLELossless
    frames = [only_frames(*header(s, k))[0] for s in (plain, rle) for k in range(2)]
    assert same_pixels(frames[0], frames[2])
    assert not same_pixels(frames[0], frames[3])


def test_same_pixels_finds_one_frame_of_a_multi_frame_instance(tmp_path: Path) -> None:
    source = write_series(tmp_path / "s", 4)
    path = write_enhanced_ct(tmp_path / "e.dcm", source, [2, 0, 3, 1])
    frames = only_frames(path, pydicom.dcmread(path, stop_before_pixels=True))
    singles = [only_frames(*header(source, k))[0] for k in range(4)]
    assert same_pixels(frames[0], singles[2])
    assert same_pixels(frames[3], singles[1])
    assert not same_pixels(frames[1], singles[1])


def test_same_pixels_says_which_file_it_cannot_read(tmp_path: Path) -> None:
    series = write_series(tmp_path, 2)
    frame = only_frames(*header(series))[0]
    series.files[0].write_bytes(b"not dicom")
    with pytest.raises(PermanentError, match=instance_key(series.files[0])):
        same_pixels(frame, frame)
