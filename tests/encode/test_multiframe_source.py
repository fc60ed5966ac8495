"""SEG and SR over multi-frame sources: frame mapping, equality with single-frame, safety check."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import EnhancedCTImageStorage

from agent.dicom.uids import derive_uid, output_uids
from agent.encode.frames import verify_frames
from agent.encode.seg import build_seg
from agent.errors import PermanentError
from tests.encode import (
    DISCLAIMER,
    SEGMENTS,
    SYNTHETIC_SIZE,
    encode,
    model,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.data import dicom_files, shared_data
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.pixelmed import assert_seg_valid, assert_sr_valid

Frames = list[tuple[int, int]]

# Stored frame j of the synthetic Enhanced CT holds slice STORED[j]: no order, not symmetric.
STORED = (3, 0, 7, 1, 9, 2, 5, 8, 4, 6)

_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "ContentDate",
    "ContentTime",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def enhanced_ct(headers: Sequence[Dataset], stored: Sequence[int]) -> Dataset:
    """Header of an Enhanced CT Image (PS3.3 A.38) whose frame j is slice stored[j] of `headers`.

    Only what the encoders read: patient, study, series, the shared pixel measures and
    orientation, and one plane position per frame (PS3.3 C.7.6.16.2.1-3).
    """
    first = headers[0]
    ds = Dataset()
    for keyword in _COPIED:
        setattr(ds, keyword, first[keyword].value)
    uids = [str(headers[z].SOPInstanceUID) for z in stored]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = derive_uid("test", "enhanced-ct", *uids)
    ds.SeriesInstanceUID = derive_uid("test", "enhanced-ct-series", *uids)
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(stored)
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in stored:
        position = Dataset()
        position.ImagePositionPatient = headers[z].ImagePositionPatient
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds


def _seg(
    source: Sequence[Dataset], masks: np.ndarray, frames: Frames | None = None
) -> hd.seg.Segmentation:
    identity = model()
    uids = output_uids(source[0].StudyInstanceUID, [ds.SOPInstanceUID for ds in source], identity)
    return build_seg(
        source,
        masks,
        SEGMENTS,
        identity,
        uids,
        frames=frames,
        instance_number=1,
        disclaimer=DISCLAIMER,
    )


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _frames_by_position(path: Path) -> dict[tuple[int, tuple[float, ...]], np.ndarray]:
    """Each SEG frame's pixels by (segment number, plane position rounded to 1 µm)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    frames = {}
    for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = item.PlanePositionSequence[0].ImagePositionPatient
        frames[(segment, tuple(round(float(v), 3) for v in position))] = frame
    return frames


def _assert_same_frames(path: Path, expected: Path) -> None:
    got, want = _frames_by_position(path), _frames_by_position(expected)
    assert sorted(got) == sorted(want)
    for key, frame in want.items():
        np.testing.assert_array_equal(got[key], frame)


def _masks(slices: int, rows: int, columns: int) -> np.ndarray:
    """Synthetic masks with segment 1 also on the first slice, so every end is covered."""
    masks = synthetic_masks(slices, rows, columns)
    masks[0, 0, 1:3, 1:4] = True
    return masks


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_headers(write_synthetic_ct(tmp_path_factory.mktemp("mf") / "ct"))


def _mapping(stored: Sequence[int], slices: Sequence[int]) -> Frames:
    """frames[z] for a volume of `slices` (indices into the single-frame headers)."""
    return [(0, stored.index(z)) for z in slices]


@pytest.mark.parametrize("slices", [range(10), range(2, 8)], ids=["all-frames", "some-frames"])
def test_seg_over_enhanced_ct_equals_seg_over_single_frames(
    headers: list[Dataset], slices: range, tmp_path: Path
) -> None:
    source = enhanced_ct(headers, STORED)
    masks = _masks(len(slices), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    frames = _mapping(STORED, slices)
    multi = _save(_seg([source], masks, frames), tmp_path / "multi.dcm")
    single = _save(_seg(headers[slices.start : slices.stop], masks), tmp_path / "single.dcm")
    _assert_same_frames(multi, single)
    assert_dciodvfy_clean(multi)
    assert_seg_valid(multi)

    seg = hd.seg.segread(multi)
    assert seg.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        [k + 1 for _, k in frames],
        segment_numbers=[spec.number for spec in SEGMENTS],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(masks, 0, -1))
    # Frames that are no slice of the masks are not referenced by any SEG frame.
    referenced = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {k + 1 for _, k in frames}


def test_sr_over_enhanced_ct_references_the_multiframe_instance(
    headers: list[Dataset], tmp_path: Path
) -> None:
    source = enhanced_ct(headers, STORED)
    masks = _masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    encoded = encode([source], masks, 0.001, frames=_mapping(STORED, range(10)))
    seg = encoded.seg
    path = _save(encoded.sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    assert_sr_valid(path)
    report = hd.sr.srread(path)
    (study,) = report.CurrentRequestedProcedureEvidenceSequence
    referenced = {
        (series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID)
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert referenced == {
        (source.SeriesInstanceUID, EnhancedCTImageStorage, source.SOPInstanceUID),
        (seg.SeriesInstanceUID, seg.SOPClassUID, seg.SOPInstanceUID),
    }
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    for group in content.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        assert segment is not None
        assert [i.UID for i in segment if i.ValueType == "UIDREF"] == [source.SeriesInstanceUID]
    # Each segment's representative point is on a stored frame of the multi-frame source.
    stored = {k + 1 for _, k in _mapping(STORED, range(10))}
    planar = content.get_planar_roi_measurement_groups()
    assert planar
    for group in planar:
        assert group.roi is not None
        (image,) = [i for i in group.roi.ContentSequence if i.ValueType == "IMAGE"]
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert int(reference.ReferencedFrameNumber) in stored


def test_all_empty_masks_over_enhanced_ct_give_one_frame_per_segment(
    headers: list[Dataset], tmp_path: Path
) -> None:
    source = enhanced_ct(headers, STORED)
    frames = _mapping(STORED, range(10))
    empty = np.zeros((len(SEGMENTS), 10, SYNTHETIC_SIZE, SYNTHETIC_SIZE), dtype=bool)
    path = _save(_seg([source], empty, frames), tmp_path / "empty.dcm")
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == len(SEGMENTS)
    assert not seg.pixel_array.any()
    # The frame lies on the first slice of the volume, which is stored frame 2.
    for item in seg.PerFrameFunctionalGroupsSequence:
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert int(reference.ReferencedFrameNumber) == STORED.index(0) + 1
    assert_dciodvfy_clean(path)
    assert_seg_valid(path)


def test_single_frame_sources_in_any_order_with_a_mapping(headers: list[Dataset]) -> None:
    shuffled = [headers[z] for z in STORED]
    masks = _masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    frames = [(STORED.index(z), 0) for z in range(len(headers))]

    def encoded(ds: Dataset) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert encoded(_seg(shuffled, masks, frames)) == encoded(_seg(headers, masks))


@pytest.fixture(scope="module")
def shared_mf() -> tuple[Dataset, list[Dataset]]:
    """dcmqi's Legacy Converted Enhanced CT and the single-frame slices it was made from."""
    folder = shared_data("dcmqi", "23x38x3")
    multi = pydicom.dcmread(folder / "multiframe" / "mf.dcm", stop_before_pixels=True)
    return multi, read_headers(dicom_files(folder / "image"))


def _shared_mapping(multi: Dataset) -> Frames:
    """The frames of `multi` in ascending z (its slice normal is +z)."""
    positions = [
        float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        for item in multi.PerFrameFunctionalGroupsSequence
    ]
    return [(0, k) for k in sorted(range(len(positions)), key=positions.__getitem__)]


def test_seg_over_legacy_converted_ct_equals_seg_over_its_slices(
    shared_mf: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    multi, singles = shared_mf
    masks = _masks(len(singles), int(multi.Rows), int(multi.Columns))
    frames = _shared_mapping(multi)
    path = _save(_seg([multi], masks, frames), tmp_path / "multi.dcm")
    _assert_same_frames(path, _save(_seg(singles, masks), tmp_path / "single.dcm"))
    assert_dciodvfy_clean(path)
    assert_seg_valid(path)
    pixels = hd.seg.segread(path).get_pixels_by_source_frame(
        multi.SOPInstanceUID,
        [k + 1 for _, k in frames],
        segment_numbers=[spec.number for spec in SEGMENTS],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(masks, 0, -1))


def test_reversed_mapping_of_legacy_converted_ct_is_refused(
    shared_mf: tuple[Dataset, list[Dataset]],
) -> None:
    multi, singles = shared_mf
    masks = _masks(len(singles), int(multi.Rows), int(multi.Columns))
    with pytest.raises(PermanentError, match="must follow the volume's slice order"):
        _seg([multi], masks, _shared_mapping(multi)[::-1])


@pytest.mark.parametrize(
    "wrong",
    [
        lambda frames: frames[::-1],
        # The stored order, as a loader that forgot to sort would give it.
        lambda frames: sorted(frames),
        lambda frames: [frames[1], frames[0], *frames[2:]],
    ],
    ids=["reversed", "stored-order", "two-swapped"],
)
def test_mapping_out_of_slice_order_is_refused(
    headers: list[Dataset], wrong: Callable[[Frames], Frames]
) -> None:
    source = enhanced_ct(headers, STORED)
    masks = _masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    with pytest.raises(PermanentError, match="is not above slice") as error:
        _seg([source], masks, wrong(_mapping(STORED, range(10))))
    assert str(headers[0].PatientName) not in str(error.value)


def _shift_second_frame(seg: Dataset) -> None:
    position = seg.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    x, y, z = (float(v) for v in position.ImagePositionPatient)
    position.ImagePositionPatient = [x, y, z + 2.5]


def _swap_references(seg: Dataset) -> None:
    """Swap the source frames of the first frame and the first one on another source frame."""
    references = [
        item.DerivationImageSequence[0].SourceImageSequence[0]
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    first = references[0]
    other = next(r for r in references if r.ReferencedFrameNumber != first.ReferencedFrameNumber)
    first.ReferencedFrameNumber, other.ReferencedFrameNumber = (
        other.ReferencedFrameNumber,
        first.ReferencedFrameNumber,
    )


@pytest.mark.parametrize("corrupt", [_shift_second_frame, _swap_references])
def test_seg_frames_that_do_not_lie_on_their_source_are_never_returned(
    headers: list[Dataset], monkeypatch: pytest.MonkeyPatch, corrupt: Callable[[Dataset], None]
) -> None:
    source = enhanced_ct(headers, STORED)
    masks = _masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    frames = _mapping(STORED, range(10))
    _seg([source], masks, frames)  # correct: passes the check
    original = hd.seg.Segmentation

    def corrupted(*args: Any, **kwargs: Any) -> hd.seg.Segmentation:
        seg = original(*args, **kwargs)
        corrupt(seg)
        return seg

    monkeypatch.setattr(hd.seg, "Segmentation", corrupted)
    with pytest.raises(PermanentError, match=r"SEG frame \d+ does not match its source image"):
        _seg([source], masks, frames)


def test_verify_frames_wants_each_referenced_frame_in_the_mapping(
    headers: list[Dataset],
) -> None:
    source = enhanced_ct(headers, STORED)
    masks = _masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    frames = _mapping(STORED, range(10))
    seg = _seg([source], masks, frames)
    verify_frames(seg, [source], frames)
    with pytest.raises(PermanentError, match="is not a slice of the masks"):
        verify_frames(seg, [source], frames[1:])
    with pytest.raises(PermanentError, match="not a source image"):
        verify_frames(seg, [enhanced_ct(headers, STORED[::-1])], frames)


def _mf_only(headers: list[Dataset], multi: Dataset) -> list[Dataset]:
    return [multi]


@pytest.mark.parametrize(
    ("sources", "frames", "message"),
    [
        (lambda h, mf: [mf, mf], [(0, 0)], "2 source images, 2 of them multi-frame"),
        (lambda h, mf: [h[0], mf], [(0, 0)], "2 source images, 1 of them multi-frame"),
        (_mf_only, None, "needs an explicit frame mapping"),
        (_mf_only, [(0, 0), (0, 10)], "frame 11 of source 0"),
        (_mf_only, [(0, 0), (1, 0)], "maps to source 1 of 1"),
        (_mf_only, [(0, 1), (0, 1)], "names a source frame twice"),
        (_mf_only, [(0, 1), (0, 3), (0, 5)], "masks have 2 slices, the frame mapping"),
        (lambda h, mf: h[:2], [(0, 1), (1, 0)], "frame 2 of source 0"),
        (lambda h, mf: h[:3], [(0, 0), (2, 0)], r"source images \[1\] are not a slice"),
        (lambda h, mf: h[:3], None, "masks have 2 slices, the frame mapping .or the source. 3"),
    ],
)
def test_bad_frame_mappings_are_refused(
    headers: list[Dataset],
    sources: Callable[[list[Dataset], Dataset], list[Dataset]],
    frames: Frames | None,
    message: str,
) -> None:
    masks = np.zeros((len(SEGMENTS), 2, SYNTHETIC_SIZE, SYNTHETIC_SIZE), dtype=bool)
    masks[0, 0, 5, 5] = True
    with pytest.raises(PermanentError, match=message):
        _seg(sources(headers, enhanced_ct(headers, STORED)), masks, frames)
