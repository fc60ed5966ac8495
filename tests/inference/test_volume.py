"""load_volume, rescale and slice spacing: pixels to Hounsfield units with the right geometry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from agent.dicom.files import read_header
from agent.domain import FrameRef
from agent.errors import PermanentError
from agent.inference.volume import load_volume, rescale
from agent.logs import instance_key
from tests.support.data import dicom_files, shared_data
from tests.support.phantom import phantom_hu, phantom_labels, write_phantom_series
from tests.support.series import (
    Series,
    write_enhanced_ct,
    write_legacy_enhanced_ct,
    write_series,
)
from tests.support.volumes import load_files, stack_refs


def test_rescale_applies_slope_and_intercept_in_float32() -> None:
    stored = np.array([[0, 1024, 4095]], dtype=np.uint16)
    assert rescale(stored, 1.0, -1024.0).tolist() == [[-1024.0, 0.0, 3071.0]]
    signed = np.array([-2000, -1, 0, 32767], dtype=np.int16)
    hu = rescale(signed, 0.5, 10.0)
    assert hu.dtype == np.float32
    assert hu.tolist() == [-990.0, 9.5, 10.0, 16393.5]


def test_real_jpeg2000_ct_loads_in_hounsfield_units() -> None:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    assert read_header(files[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    volume = load_files(files)
    assert volume.hu.shape == (20, 512, 512)
    assert volume.hu.dtype == np.float32
    assert float(np.percentile(volume.hu, 5)) == pytest.approx(-1000.0, abs=40.0)  # air
    assert float(volume.hu.max()) > 300.0  # bone
    # SliceThickness says 3 mm, but the slices were reconstructed every 2 mm (overlapping):
    # the voxel size along z comes from the positions.
    assert float(volume.sources[0].SliceThickness) == 3.0
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    z = [float(volume.sources[i].ImagePositionPatient[2]) for i, _ in volume.source_frames]
    assert z == sorted(z)
    assert all("PixelData" not in ds for ds in volume.sources)
    assert [ds.SOPInstanceUID for ds in volume.sources] == [
        read_header(r.path).SOPInstanceUID for r in volume.frames
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
    volume = load_files(reversed(truth.files))  # the order of the files does not matter
    assert tuple(r.path for r in volume.frames) == truth.files
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
    with pytest.raises(PermanentError, match=instance_key(broken)):
        load_volume([FrameRef(p) for p in truth.files])


def test_files_that_no_longer_stack_are_a_permanent_error(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, slices=4, rows=32, cols=32, pixel_spacing=12.0)
    refs = stack_refs(truth.files)
    ds = pydicom.dcmread(truth.files[2])
    ds.ImagePositionPatient = list(pydicom.dcmread(truth.files[1]).ImagePositionPatient)
    ds.save_as(truth.files[2])
    with pytest.raises(PermanentError, match=r"do not form a volume|no longer form"):
        load_volume(refs)


def test_frames_given_out_of_slice_order_are_refused(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, slices=4, rows=32, cols=32, pixel_spacing=12.0)
    refs = stack_refs(truth.files)
    with pytest.raises(PermanentError, match="no longer form the selected stack"):
        load_volume([refs[1], refs[0], *refs[2:]])


def test_no_files_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError):
        load_volume([])


def test_multiframe_and_single_frame_forms_give_the_same_volume() -> None:
    """dcmqi's 23x38x3: a Legacy Converted Enhanced CT and the same slices single-frame."""
    folder = shared_data("dcmqi", "23x38x3")
    single = load_files(dicom_files(folder / "image"))
    multi = load_files([folder / "multiframe" / "mf.dcm"])
    np.testing.assert_array_equal(multi.hu, single.hu)
    assert multi.spacing == pytest.approx(single.spacing)
    assert len(multi.sources) == 1 and len(single.sources) == 3
    # Slice z is a frame of the one multi-frame source; its position is that slice's.
    for (_, frame), (i, _) in zip(multi.source_frames, single.source_frames, strict=True):
        item = multi.sources[0].PerFrameFunctionalGroupsSequence[frame]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in single.sources[i].ImagePositionPatient]
        assert position == pytest.approx(expected)


@pytest.mark.parametrize("writer", [write_enhanced_ct, write_legacy_enhanced_ct])
def test_enhanced_ct_with_frames_out_of_order_loads_like_its_source(
    tmp_path: Path, writer: Callable[[Path, Series], Path]
) -> None:
    source = write_series(tmp_path / "single", 7)
    single = load_files(source.files)
    multi = load_files([writer(tmp_path / "multi.dcm", source)])
    np.testing.assert_array_equal(multi.hu, single.hu)
    assert multi.spacing == pytest.approx(single.spacing)
    assert [f for _, f in multi.source_frames] != list(range(7))  # stored out of slice order
