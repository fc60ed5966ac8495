"""Series selection with the default ct-tissue rules: which series, and in which slice order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    SegmentationStorage,
    generate_uid,
)

from agent.assembly.rules import select
from agent.dicom.files import read_header
from agent.errors import StudySkipped
from agent.settings import ModelSettings
from tests.support.data import dicom_files, shared_data
from tests.support.phantom import write_phantom_series
from tests.support.series import (
    write_oblique,
    write_sagittal,
    write_with_duplicates,
    write_with_gap,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Feet-first supine: rows run to patient right, so the normal points to the feet (-z).
AXIAL_FEET_FIRST = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def ct_slice(
    series_uid: str,
    z: float,
    *,
    series_number: int | None = 1,
    orientation: Sequence[float] = AXIAL,
    rows: int = 64,
    sop_uid: str | None = None,
) -> Dataset:
    """A pixel-less CT Image Storage header, enough for selection."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.PixelSpacing = [0.8, 0.8]
    ds.Rows = rows
    ds.Columns = 64
    return ds


def ct_series(
    name: str,
    positions: Sequence[float],
    *,
    series_uid: str | None = None,
    series_number: int | None = 1,
    orientation: Sequence[float] = AXIAL,
) -> dict[Path, Dataset]:
    """Headers of one series, keyed by made-up paths that do not follow slice order."""
    uid = series_uid or str(generate_uid())
    return {
        Path(f"/study/{name}/{random.Random(i).getrandbits(32):08x}.dcm"): ct_slice(
            uid, z, series_number=series_number, orientation=orientation
        )
        for i, z in enumerate(positions)
    }


def select_series(headers: dict[Path, Dataset]) -> tuple[Path, ...]:
    """The files the default model takes, in slice order; StudySkipped with its reason if none."""
    (choice,) = select(headers, [ModelSettings()])
    if choice.input is None:
        raise StudySkipped(choice.reason)
    return tuple(f.path for f in choice.input.frames)


def other_object(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    return ds


def z_of(headers: dict[Path, Dataset], files: Sequence[Path]) -> list[float]:
    return [float(headers[p].ImagePositionPatient[2]) for p in files]


def test_largest_axial_ct_series_wins() -> None:
    headers = {
        **ct_series("small", [0, 2, 4, 6, 8], series_number=2),
        **ct_series("large", [float(z) for z in range(0, 40, 2)], series_number=3),
        # More instances, but sagittal, and a multi-frame enhanced CT: neither qualifies.
        **ct_series("sagittal", [float(z) for z in range(60)], orientation=SAGITTAL),
        Path("/study/enhanced.dcm"): other_object(EnhancedCTImageStorage, "CT"),
        Path("/study/seg.dcm"): other_object(SegmentationStorage, "SEG"),
        Path("/study/sr.dcm"): other_object(EnhancedSRStorage, "SR"),
    }
    files = select_series(headers)
    assert len(files) == 20
    assert all(p.parent.name == "large" for p in files)


def test_equal_sizes_go_to_the_lowest_series_number_then_uid() -> None:
    positions = [0.0, 3.0, 6.0, 9.0]
    headers = {
        **ct_series("five", positions, series_number=5),
        **ct_series("four", positions, series_number=4),
        **ct_series("unnumbered", positions, series_number=None),
    }
    assert {p.parent.name for p in select_series(headers)} == {"four"}
    headers = {
        **ct_series("b", positions, series_uid="1.2.3.9"),
        **ct_series("a", positions, series_uid="1.2.3.10"),
    }
    # UIDs compare as strings: "1.2.3.10" < "1.2.3.9".
    assert {p.parent.name for p in select_series(headers)} == {"a"}


@pytest.mark.parametrize("order", ["descending", "shuffled"])
def test_head_first_slices_are_sorted_by_ascending_z(order: str) -> None:
    positions = [float(z) for z in range(0, 50, 5)]
    positions = positions[::-1] if order == "descending" else random.Random(3).sample(positions, 10)
    headers = ct_series("s", positions)
    assert z_of(headers, select_series(headers)) == sorted(positions)


def test_feet_first_slices_are_sorted_along_their_normal() -> None:
    positions = random.Random(4).sample([float(z) for z in range(-300, -200, 10)], 10)
    headers = ct_series("s", positions, orientation=AXIAL_FEET_FIRST)
    # The normal is -z, so ascending position along it is descending z.
    assert z_of(headers, select_series(headers)) == sorted(positions, reverse=True)


def test_gantry_tilt_with_positions_along_the_table_is_refused() -> None:
    # Planes tilted about 8 degrees while the table steps along z: a sheared volume.
    tilted = (1.0, 0.0, 0.0, 0.0, 0.990268, 0.139173)
    with pytest.raises(StudySkipped, match="gantry tilt or shear"):
        select_series(ct_series("s", [0.0, 2.0, 4.0, 6.0], orientation=tilted))


def test_slightly_oblique_stack_along_its_normal_is_axial(tmp_path: Path) -> None:
    series = write_oblique(tmp_path, slices=6, degrees=8.0)
    assert len(select_series({p: read_header(p) for p in series.files})) == 6


def test_phantom_series_with_shuffled_names_is_sorted(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, slices=12, rows=32, cols=32, pixel_spacing=12.0)
    files = dicom_files(tmp_path)
    assert files != list(truth.files)  # the names really are out of slice order
    assert select_series({p: read_header(p) for p in files}) == truth.files


def test_a_copy_of_the_same_instance_is_counted_once() -> None:
    headers = ct_series("s", [0.0, 1.0, 2.0, 3.0])
    path, ds = next(iter(headers.items()))
    headers[path.with_name("copy.dcm")] = ds
    assert len(select_series(headers)) == 4


@pytest.mark.parametrize(
    ("positions", "reason"),
    [
        ([0.0, 2.0, 4.0, 6.5, 8.5], "non-uniform slice spacing"),
        ([0.0, 2.0, 4.0, 8.0, 10.0], "missing slices"),
        ([0.0, 2.0], "2 slices, fewer than min_slices 3"),
    ],
)
def test_unusable_geometry_skips_with_reason(positions: list[float], reason: str) -> None:
    with pytest.raises(StudySkipped) as caught:
        select_series(ct_series("s", positions))
    assert reason in caught.value.reason


def test_small_gap_jitter_is_regular() -> None:
    headers = ct_series("s", [0.0, 2.0, 4.05, 6.0, 8.02])
    assert len(select_series(headers)) == 5


def test_different_images_at_one_position_skip(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, slices=6, different=[2])
    with pytest.raises(StudySkipped, match="duplicate slice positions with different images"):
        select_series({p: read_header(p) for p in series.files})


def test_exact_copies_are_dropped(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, slices=6, resent=[1], copies=[4])
    assert len(select_series({p: read_header(p) for p in series.files})) == 6


def test_a_broken_large_series_falls_back_to_a_usable_one(tmp_path: Path) -> None:
    broken = write_with_gap(tmp_path / "broken", slices=12, missing=[5])
    headers = {p: read_header(p) for p in broken.files}
    good = ct_series("good", [0.0, 1.0, 2.0, 3.0], series_number=2)
    assert {p.parent.name for p in select_series({**headers, **good})} == {"good"}


def test_an_odd_sized_image_in_a_series_is_dropped() -> None:
    headers = ct_series("s", [0.0, 1.0, 2.0, 3.0])
    odd = next(iter(headers))
    headers[odd].Rows = 32
    files = select_series(headers)
    assert len(files) == 3 and odd not in files


def test_only_non_axial_ct_skips(tmp_path: Path) -> None:
    series = write_sagittal(tmp_path, slices=5)
    with pytest.raises(StudySkipped) as caught:
        select_series({p: read_header(p) for p in series.files})
    assert caught.value.reason == (
        "ct-tissue: series 1 (CT, 5 instances): sagittal stack, the model takes axial"
    )


def test_mr_study_skips_naming_the_modality() -> None:
    folder = shared_data("pacsman-dummy-mr")
    with pytest.raises(StudySkipped) as caught:
        select_series({p: read_header(p) for p in dicom_files(folder)})
    assert caught.value.reason == "ct-tissue: no CT series (modalities: MR)"


def test_multiframe_ct_is_selected_and_a_seg_is_not() -> None:
    seg = shared_data("dcmqi", "liver.dcm")
    multiframe = shared_data("dcmqi", "23x38x3", "multiframe", "mf.dcm")
    (choice,) = select({p: read_header(p) for p in (seg, multiframe)}, [ModelSettings()])
    assert choice.input is not None
    assert [(f.path, f.index) for f in choice.input.frames] == [
        (multiframe, i) for i in _frame_order(multiframe)
    ]


def test_seg_beside_its_ct_is_ignored() -> None:
    ct = dicom_files(shared_data("dcmqi", "ct-3slice"))
    seg = shared_data("dcmqi", "liver.dcm")
    headers = {p: read_header(p) for p in [*ct, seg]}
    files = select_series(headers)
    assert set(files) == set(ct)
    # Positions fall with the file names: -126.69, -127.69, -128.69.
    assert files == tuple(reversed(ct))


def test_single_frame_copy_wins_over_multiframe() -> None:
    single = dicom_files(shared_data("dcmqi", "23x38x3", "image"))
    multiframe = shared_data("dcmqi", "23x38x3", "multiframe", "mf.dcm")
    headers = {p: read_header(p) for p in [*single, multiframe]}
    assert select_series(headers) == tuple(single)


def test_real_ct_is_selected_whole() -> None:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    selected = select_series({p: read_header(p) for p in files})
    assert len(selected) == 20
    z = [float(read_header(p).ImagePositionPatient[2]) for p in selected]
    assert z == sorted(z)


def _frame_order(path: Path) -> list[int]:
    """Frame indexes of a multi-frame image sorted along its normal (its frames' positions)."""
    ds = read_header(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    row, col = orientation[:3], orientation[3:]
    normal = [
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    ]
    along = [
        sum(
            n * float(p)
            for n, p in zip(normal, item.PlanePositionSequence[0].ImagePositionPatient, strict=True)
        )
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    return sorted(range(len(along)), key=along.__getitem__)


def test_unreadable_duplicate_makes_the_series_unusable_not_the_assembler(tmp_path: Path) -> None:
    series = write_with_duplicates(tmp_path, slices=6, different=[2])
    headers = {p: read_header(p) for p in series.files}
    series.files[-1].write_bytes(b"gone")  # truncated after its header was read
    with pytest.raises(StudySkipped, match="cannot read"):
        select_series(headers)
