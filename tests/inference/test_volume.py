"""load_volume, rescale and slice spacing: pixels to Hounsfield units with the right geometry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from agent.dicom.files import read_header
from agent.errors import PermanentError
from agent.inference.volume import load_volume, rescale, select_series, slice_spacing
from tests.support.data import dicom_files, shared_data
from tests.support.phantom import phantom_hu, phantom_labels, write_phantom_series


def test_rescale_applies_slope_and_intercept_in_float32() -> None:
    stored = np.array([[0, 1024, 4095]], dtype=np.uint16)
    assert rescale(stored, 1.0, -1024.0).tolist() == [[-1024.0, 0.0, 3071.0]]
    signed = np.array([-2000, -1, 0, 32767], dtype=np.int16)
    hu = rescale(signed, 0.5, 10.0)
    assert hu.dtype == np.float32
    assert hu.tolist() == [-990.0, 9.5, 10.0, 16393.5]


def test_slice_spacing_is_the_median_gap_between_positions() -> None:
    assert slice_spacing([0.0, 2.5, 5.0, 7.5]) == 2.5
    assert slice_spacing([7.5, 0.0, 5.0, 2.5]) == 2.5  # order does not matter
    assert slice_spacing([-10.0, -9.0, -7.95, -7.0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("positions", "reason"),
    [
        ([0.0, 1.0, 1.0], "duplicate"),
        ([0.0, 1.0, 2.0, 3.5], "irregular slice spacing"),
        ([0.0], "fewer than 2"),
    ],
)
def test_slice_spacing_rejects_what_is_no_stack(positions: list[float], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        slice_spacing(positions)


def test_real_jpeg2000_ct_loads_in_hounsfield_units() -> None:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    assert read_header(files[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    volume = load_volume(select_series({p: read_header(p) for p in files}))
    assert volume.hu.shape == (20, 512, 512)
    assert volume.hu.dtype == np.float32
    assert float(np.percentile(volume.hu, 5)) == pytest.approx(-1000.0, abs=40.0)  # air
    assert float(volume.hu.max()) > 300.0  # bone
    # SliceThickness says 3 mm, but the slices were reconstructed every 2 mm (overlapping):
    # the voxel size along z comes from the positions.
    assert float(volume.headers[0].SliceThickness) == 3.0
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.headers]
    assert z == sorted(z)
    assert all("PixelData" not in ds for ds in volume.headers)
    assert [ds.SOPInstanceUID for ds in volume.headers] == [
        read_header(p).SOPInstanceUID for p in volume.files
    ]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_phantom_round_trips_through_dicom(tmp_path: Path, syntax: UID) -> None:
    shape = (6, 48, 40)
    truth = write_phantom_series(
        tmp_path,
        slices=6,
        rows=48,
        cols=40,
        pixel_spacing=9.0,
        slice_spacing=4.0,
        transfer_syntax=syntax,
    )
    volume = load_volume(list(reversed(truth.files)))  # order of the argument does not matter
    assert volume.files == truth.files
    assert volume.spacing == (4.0, 9.0, 9.0)
    expected = np.round(phantom_hu(phantom_labels(*shape, 9.0, 4.0)))
    np.testing.assert_array_equal(volume.hu, expected)


def test_undecodable_pixel_data_is_a_permanent_error(tmp_path: Path) -> None:
    truth = write_phantom_series(
        tmp_path, slices=3, rows=32, cols=32, pixel_spacing=12.0, transfer_syntax=JPEG2000Lossless
    )
    broken = truth.files[1]
    ds = pydicom.dcmread(broken)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.save_as(broken)
    with pytest.raises(
        PermanentError, match=re.escape(f"cannot decode pixel data of {broken.name}")
    ):
        load_volume(truth.files)


def test_files_that_no_longer_stack_are_a_permanent_error(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, slices=4, rows=32, cols=32, pixel_spacing=12.0)
    ds = pydicom.dcmread(truth.files[2])
    ds.ImagePositionPatient = list(pydicom.dcmread(truth.files[1]).ImagePositionPatient)
    ds.save_as(truth.files[2])
    with pytest.raises(PermanentError, match="duplicate slice positions"):
        load_volume(truth.files)


def test_no_files_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError):
        load_volume([])
