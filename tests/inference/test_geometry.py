"""gate: the stacks a series' frames form, or the specific reason they form none."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.utils import pixel_array
from pydicom.uid import RLELossless

from agent.inference.frames import Frame, frames_of
from agent.inference.geometry import Rejected, Stack, gate
from tests.support.data import dicom_files, shared_data
from tests.support.series import (
    CORONAL,
    SAGITTAL,
    Series,
    stack_specs,
    tilted,
    write_enhanced_ct,
    write_enhanced_mr,
    write_legacy_enhanced_ct,
    write_non_uniform,
    write_oblique,
    write_renumbered,
    write_sagittal,
    write_series,
    write_sheared,
    write_specs,
    write_two_acquisitions,
    write_with_duplicates,
    write_with_gap,
    write_with_localizer,
    write_without_position,
)


def frames_in(files: Iterable[Path]) -> list[Frame]:
    frames: list[Frame] = []
    for path in files:
        got = frames_of(path, pydicom.dcmread(path, stop_before_pixels=True))
        assert not isinstance(got, str), f"{path.name}: {got}"
        frames += got
    return frames


def stacks_of(files: Iterable[Path]) -> list[Stack]:
    got = gate(frames_in(files))
    assert not isinstance(got, Rejected), got.reason
    return got


def one_stack(files: Iterable[Path]) -> Stack:
    (stack,) = stacks_of(files)
    return stack


def reason(files: Iterable[Path]) -> str:
    got = gate(frames_in(files))
    assert isinstance(got, Rejected), f"accepted: {got}"
    return got.reason


def along(stack: Stack) -> list[float]:
    return [float(np.dot(stack.normal, f.position)) for f in stack.frames]


def pixels(stack: Stack) -> list[np.ndarray]:
    return [pixel_array(f.path, index=f.index) for f in stack.frames]


def test_clean_series_is_one_axial_stack_in_position_order(tmp_path: Path) -> None:
    series = write_series(tmp_path, 12)
    stack = one_stack(series.files)
    assert stack.orientation == "axial"
    assert stack.normal == (0.0, 0.0, 1.0)
    assert stack.spacing == pytest.approx((2.5, 6.0, 6.0))
    assert along(stack) == pytest.approx([-13.75 + 2.5 * k for k in range(12)])
    assert [f.sop_uid for f in stack.frames] == list(series.sop_uids)
    assert stack.paths == series.files
    assert stack.thickness == 2.5
    assert stack.notes == ()


# 1. Mixed orientations and sizes


def test_localizer_is_dropped_with_a_note(tmp_path: Path) -> None:
    series = write_with_localizer(tmp_path, 12)
    stack = one_stack(series.files)
    assert len(stack.frames) == 12
    assert series.files[-1] not in stack.paths
    assert stack.notes == ("dropped 1 localizer image",)


def test_scout_of_other_geometry_is_dropped_even_unlabelled(tmp_path: Path) -> None:
    series = write_with_localizer(tmp_path, 12, flagged=False)
    stack = one_stack(series.files)
    assert len(stack.frames) == 12
    assert stack.notes == ("dropped 1 image of another orientation, size and pixel spacing",)


def test_two_real_stacks_of_other_orientations_are_both_returned(tmp_path: Path) -> None:
    specs = [*stack_specs(8, orientation=SAGITTAL), *stack_specs(12, seed=1)]
    axial, sagittal = stacks_of(write_specs(tmp_path, specs).files)
    assert (len(axial.frames), axial.orientation) == (12, "axial")
    assert (len(sagittal.frames), sagittal.orientation) == (8, "sagittal")
    assert axial.notes == ("stack 1 of 2 (axial 64x64)",)
    assert sagittal.notes == ("stack 2 of 2 (sagittal 64x64)",)


def test_a_small_broken_stack_is_dropped_beside_a_good_one(tmp_path: Path) -> None:
    coronal = [s for k, s in enumerate(stack_specs(5, orientation=CORONAL)) if k != 2]
    stack = one_stack(write_specs(tmp_path, [*stack_specs(12), *coronal]).files)
    assert len(stack.frames) == 12
    assert stack.notes == (
        "dropped stack coronal 64x64: missing slices: 5 mm gap after slice 2 of 4 "
        "(median spacing 2.5 mm)",
    )


def test_a_broken_largest_stack_rejects_the_series(tmp_path: Path) -> None:
    axial = [s for k, s in enumerate(stack_specs(12)) if k != 6]
    specs = [*axial, *stack_specs(5, orientation=CORONAL)]
    assert reason(write_specs(tmp_path, specs).files) == (
        "stack axial 64x64: missing slices: 5 mm gap after slice 6 of 11 (median spacing 2.5 mm)"
    )


# 2. Several stacks in one series


def test_two_acquisitions_at_the_same_positions_are_two_stacks(tmp_path: Path) -> None:
    series = write_two_acquisitions(tmp_path, 10)
    first, second = stacks_of(series.files)
    assert along(first) == pytest.approx(along(second))
    assert {f.stack_key[0] for f in first.frames} == {"AcquisitionNumber 1"}
    assert {f.stack_key[0] for f in second.frames} == {"AcquisitionNumber 2"}
    assert first.notes == ("stack 1 of 2 (AcquisitionNumber 1)",)
    assert second.notes == ("stack 2 of 2 (AcquisitionNumber 2)",)


def test_interleaved_acquisitions_are_never_merged(tmp_path: Path) -> None:
    # Acquisition 2 fills the gaps of acquisition 1: together they would look like one stack
    # at half the spacing, mixing two acquisitions slice by slice.
    specs = stack_specs(12)
    specs = [replace(s, acquisition_number=1 + k % 2) for k, s in enumerate(specs)]
    first, second = stacks_of(write_specs(tmp_path, specs).files)
    assert (len(first.frames), len(second.frames)) == (6, 6)
    assert first.spacing[0] == pytest.approx(5.0)


def test_acquisition_per_rotation_is_one_stack(tmp_path: Path) -> None:
    # Step-and-shoot CT counts an acquisition per rotation of 4 slices.
    specs = [replace(s, acquisition_number=1 + k // 4) for k, s in enumerate(stack_specs(12))]
    stack = one_stack(write_specs(tmp_path, specs).files)
    assert len(stack.frames) == 12
    assert stack.notes == ("joined 3 AcquisitionNumber values that cover separate positions",)


def test_enhanced_mr_with_two_stack_ids_is_two_stacks(tmp_path: Path) -> None:
    path = write_enhanced_mr(tmp_path / "mr.dcm", stacks=2, frames_per_stack=6)
    first, second = stacks_of([path])
    assert [f.index for f in first.frames] == [0, 2, 4, 6, 8, 10]
    assert [f.index for f in second.frames] == [1, 3, 5, 7, 9, 11]
    assert first.spacing == pytest.approx((4.0, 6.0, 6.0))
    assert first.notes == ("stack 1 of 2 (StackID 1)",)
    assert second.notes == ("stack 2 of 2 (StackID 2)",)


def test_stack_ids_split_even_where_positions_do_not_collide(tmp_path: Path) -> None:
    path = write_enhanced_mr(tmp_path / "mr.dcm", stacks=2, frames_per_stack=4, offset_mm=50.0)
    first, second = stacks_of([path])
    assert along(second)[0] - along(first)[0] == pytest.approx(50.0)


# 3. Duplicate positions


def test_a_sop_instance_received_twice_is_dropped(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, 12, resent=(4,))
    stack = one_stack(series.files)
    assert len(stack.frames) == 12
    assert stack.notes == ("dropped 1 exact duplicate (one SOP instance received twice)",)


def test_another_instance_with_the_same_pixels_is_dropped(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, 12, copies=(2, 9))
    stack = one_stack(series.files)
    assert len(stack.frames) == 12
    # One of each pair is kept, whichever: they are the same image.
    assert len({f.position for f in stack.frames}) == 12
    assert stack.notes == (
        "dropped 2 exact duplicates (another SOP instance with the same position and pixel data)",
    )


def test_a_compressed_copy_of_the_same_pixels_is_a_duplicate(tmp_path: Path) -> None:
    series = write_series(tmp_path, 6, study_uid="1.2.3")
    copy = write_specs(
        tmp_path,
        [replace(stack_specs(6)[3], sop_uid="1.2.3.99")],
        study_uid="1.2.3",
        transfer_syntax=RLELossless,
    )
    stack = one_stack([*series.files, *copy.files])
    assert len(stack.frames) == 6
    assert "dropped 1 exact duplicate" in stack.notes[0]


def test_different_images_at_one_position_reject_the_series(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, 12, different=(2, 5, 7))
    assert reason(series.files) == "duplicate slice positions with different images at 3 positions"


def test_pixels_are_compared_only_where_positions_collide(tmp_path: Path) -> None:
    frames = frames_in(write_with_duplicates(tmp_path, 12, copies=(3,)).files)
    calls: list[tuple[Frame, Frame]] = []

    def compare(a: Frame, b: Frame) -> bool:
        calls.append((a, b))
        return True

    assert not isinstance(gate(frames, compare=compare), Rejected)
    ((a, b),) = calls
    assert a.position == b.position
    # The same position with another rescale is another image, whatever the stored values.
    rescaled = [replace(f, slope=2.0) if f.sop_uid == b.sop_uid else f for f in frames]
    got = gate(rescaled, compare=compare)
    assert isinstance(got, Rejected)
    assert got.reason == "duplicate slice positions with different images at 1 position"


def test_one_instance_received_twice_with_other_headers_is_refused(tmp_path: Path) -> None:
    frames = frames_in(write_series(tmp_path, 6).files)
    moved = replace(frames[2], path=tmp_path / "again.dcm", position=(0.0, 0.0, 100.0))
    got = gate([*frames, moved])
    assert got == Rejected("1 SOP instance received twice with different headers")


# 4-5. Missing slices and non-uniform spacing


def test_missing_slice_names_the_gap_and_the_median(tmp_path: Path) -> None:
    series = write_with_gap(tmp_path, 12, missing=(5,))
    assert reason(series.files) == (
        "missing slices: 5 mm gap after slice 5 of 11 (median spacing 2.5 mm)"
    )


def test_several_gaps_are_counted(tmp_path: Path) -> None:
    series = write_with_gap(tmp_path, 12, missing=(3, 4, 8))
    assert reason(series.files) == (
        "missing slices: 2 gaps of up to 7.5 mm, the first after slice 3 of 9 "
        "(median spacing 2.5 mm)"
    )


def test_non_uniform_spacing_is_refused(tmp_path: Path) -> None:
    series = write_non_uniform(tmp_path, 12, index=6, shift_mm=0.6)
    assert reason(series.files) == (
        "non-uniform slice spacing: gaps from 1.9 to 3.1 mm (median 2.5 mm)"
    )


def test_spacing_within_ten_percent_is_uniform(tmp_path: Path) -> None:
    stack = one_stack(write_non_uniform(tmp_path, 12, index=6, shift_mm=0.2).files)
    assert stack.spacing[0] == pytest.approx(2.5)


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    specs = [replace(s, thickness=5.0) for s in stack_specs(8)]
    stack = one_stack(write_specs(tmp_path, specs).files)
    assert stack.spacing[0] == pytest.approx(2.5)
    assert stack.thickness == 5.0


# 6. Gantry tilt and shear


def test_sheared_positions_are_refused_as_gantry_tilt(tmp_path: Path) -> None:
    series = write_sheared(tmp_path, 12, degrees=15.0)
    assert reason(series.files) == (
        "gantry tilt or shear of 15.0 degrees: the slice positions step off the slice normal "
        "(GantryDetectorTilt 15)"
    )


@pytest.mark.parametrize(("degrees", "accepted"), [(0.3, True), (1.0, False)])
def test_shear_tolerance_is_half_a_degree(tmp_path: Path, degrees: float, accepted: bool) -> None:
    got = gate(frames_in(write_sheared(tmp_path, 12, degrees=degrees).files))
    assert isinstance(got, list) == accepted


def test_tilted_planes_stepping_along_their_normal_are_an_oblique_stack(tmp_path: Path) -> None:
    stack = one_stack(write_oblique(tmp_path, 12, degrees=20.0).files)
    assert stack.orientation == "oblique"
    t = math.radians(20.0)
    assert stack.normal == pytest.approx((0.0, math.sin(t), math.cos(t)))
    assert stack.spacing[0] == pytest.approx(2.5)
    assert stack.notes == (
        "GantryDetectorTilt 20 degrees, but the slice positions step along the slice normal: "
        "volume built from the positions",
    )


def test_positions_off_one_line_are_refused(tmp_path: Path) -> None:
    specs = stack_specs(8)
    # Offsets in x that balance out: no overall drift, but 4 mm wobble (over half a pixel).
    offsets = (0.0, 4.0, -4.0, 0.0, 0.0, -4.0, 4.0, 0.0)
    zigzag = []
    for s, dx in zip(specs, offsets, strict=True):
        assert s.position is not None
        x, y, z = s.position
        zigzag.append(replace(s, position=(x + dx, y, z)))
    assert reason(write_specs(tmp_path, zigzag).files) == (
        "slice positions are not on one line: in-plane offsets up to 4 mm"
    )


# 7. Instance numbers


@pytest.mark.parametrize(
    ("order", "note"),
    [
        ("reversed", "sorted 12 slices whose instance numbers were reversed"),
        ("shuffled", "sorted 12 slices whose instance numbers were out of order"),
    ],
)
def test_slices_are_sorted_by_position_whatever_their_numbers(
    tmp_path: Path, order: str, note: str
) -> None:
    series = write_renumbered(tmp_path, 12, order=order)
    stack = one_stack(series.files)
    assert along(stack) == sorted(along(stack))
    assert [f.sop_uid for f in stack.frames] == list(series.sop_uids)
    assert stack.notes == (note,)


def test_input_order_does_not_change_the_stack(tmp_path: Path) -> None:
    frames = frames_in(write_series(tmp_path, 12).files)
    assert gate(frames) == gate(frames[::-1])


# 8. Missing geometry


def test_an_image_without_position_has_a_reason_and_leaves_a_hole(tmp_path: Path) -> None:
    series = write_without_position(tmp_path, 12, missing=(3,))
    path = series.files[3]
    assert frames_of(path, pydicom.dcmread(path)) == "missing ImagePositionPatient"
    rest = frames_in(p for p in series.files if p != path)
    got = gate(rest)
    assert isinstance(got, Rejected)
    assert got.reason.startswith("missing slices: 5 mm gap after slice 3 of 11")


# 9. Orientations


@pytest.mark.parametrize(
    ("orientation", "name"),
    [
        (SAGITTAL, "sagittal"),
        (CORONAL, "coronal"),
        ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "axial"),  # feet first: the normal is -z
        (tilted(8.0), "axial"),
        (tilted(12.0), "oblique"),
    ],
)
def test_orientation_is_named_by_the_normal(
    tmp_path: Path, orientation: tuple[float, float, float, float, float, float], name: str
) -> None:
    stack = one_stack(write_series(tmp_path, 6, orientation=orientation).files)
    assert stack.orientation == name
    assert along(stack) == pytest.approx(sorted(along(stack)))
    assert stack.spacing[0] == pytest.approx(2.5)


def test_sagittal_series_is_a_stack_not_a_refusal(tmp_path: Path) -> None:
    stack = one_stack(write_sagittal(tmp_path, 12).files)
    # Rows run anterior to posterior, columns head to feet: the normal points to patient right.
    assert (stack.orientation, stack.normal) == ("sagittal", (-1.0, 0.0, 0.0))


# 10. Too few frames


def test_fewer_than_two_frames_are_refused(tmp_path: Path) -> None:
    frames = frames_in(write_series(tmp_path, 2).files)
    assert gate([]) == Rejected("no image frames")
    assert gate(frames[:1]) == Rejected(
        "no 2 frames share one orientation, size and pixel spacing (1 frame)"
    )


def test_one_slice_and_a_localizer_are_refused(tmp_path: Path) -> None:
    series = write_with_localizer(tmp_path, 1)
    assert reason(series.files) == (
        "no 2 frames besides localizers share one orientation, size and pixel spacing (1 frame)"
    )


# Per-frame pixel transform


def test_rescale_may_differ_from_frame_to_frame(tmp_path: Path) -> None:
    specs = [replace(s, slope=1.0 + k / 10) for k, s in enumerate(stack_specs(6))]
    stack = one_stack(write_specs(tmp_path, specs).files)
    assert [f.slope for f in stack.frames] == pytest.approx([1.0 + k / 10 for k in range(6)])


def test_thickness_is_the_median_or_none(tmp_path: Path) -> None:
    specs = [replace(s, thickness=t) for s, t in zip(stack_specs(3), (2.0, 3.0, 5.0), strict=True)]
    assert one_stack(write_specs(tmp_path / "a", specs).files).thickness == 3.0
    specs = [replace(s, thickness=None) for s in stack_specs(3)]
    assert one_stack(write_specs(tmp_path / "b", specs).files).thickness is None


# Multi-frame against single-frame


def assert_same_stack(a: Stack, b: Stack) -> None:
    # approx compares flat sequences of numbers (pytest 9 refuses nested ones).
    assert [c for f in a.frames for c in f.position] == pytest.approx(
        [c for f in b.frames for c in f.position]
    )
    assert a.spacing == pytest.approx(b.spacing)
    assert a.normal == pytest.approx(b.normal)
    assert (a.orientation, a.thickness) == (b.orientation, b.thickness)
    assert [(f.slope, f.intercept) for f in a.frames] == [(f.slope, f.intercept) for f in b.frames]
    for x, y in zip(pixels(a), pixels(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_real_legacy_converted_ct_matches_its_single_frame_slices() -> None:
    folder = shared_data("dcmqi", "23x38x3")
    multi = one_stack([folder / "multiframe" / "mf.dcm"])
    single = one_stack(dicom_files(folder / "image"))
    assert len(multi.frames) == 3
    assert multi.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert_same_stack(multi, single)


@pytest.mark.parametrize("write", [write_enhanced_ct, write_legacy_enhanced_ct])
def test_enhanced_ct_from_a_series_matches_the_series(
    tmp_path: Path, write: Callable[[Path, Series], Path]
) -> None:
    source = write_series(tmp_path / "single", 10)
    single = one_stack(source.files)
    path = write(tmp_path / "multi.dcm", source)
    multi = one_stack([path])
    assert [f.index for f in multi.frames] != list(range(10))  # stored out of slice order
    assert multi.notes == ("sorted 10 frames stored out of order",)
    assert_same_stack(multi, single)
