"""Third-party viewers' loaders (dcmjs, Cornerstone3D, OHIF) on the SEG and SR we encode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.domain import Measurement, SegmentSpec
from tests.encode import SEGMENTS, encode, synthetic_masks, write_synthetic_ct
from tests.support.data import dicom_files, shared_data
from tests.support.viewers import (
    assert_labelmaps_are_highdicoms,
    cornerstone_labelmaps,
    run_loader,
)


@dataclass(frozen=True)
class Case:
    """A SEG and SR saved as the agent sends them, over `sources` in slice order."""

    seg_path: Path
    sr_path: Path
    sources: list[Path]
    measurements: list[Measurement]

    def located(self) -> list[tuple[SegmentSpec, Measurement]]:
        """Segments with voxels, and their measurements."""
        pairs = zip(SEGMENTS, self.measurements, strict=True)
        return [(spec, m) for spec, m in pairs if m.voxel_count]


def _case(sources: list[Path], folder: Path) -> Case:
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in sources}
    ordered = sorted(sources, key=lambda p: float(headers[p].ImagePositionPatient[2]))
    first = headers[ordered[0]]
    masks = synthetic_masks(len(ordered), int(first.Rows), int(first.Columns))
    dy, dx = (float(v) for v in first.PixelSpacing)
    voxel_ml = dy * dx * float(first.SliceThickness) / 1000.0
    encoded = encode([headers[p] for p in ordered], masks, voxel_ml)
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    encoded.seg.save_as(seg_path, enforce_file_format=True)
    encoded.sr.save_as(sr_path, enforce_file_format=True)
    return Case(seg_path, sr_path, ordered, encoded.measurements)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("synthetic-viewers")
    return _case(write_synthetic_ct(folder / "ct"), folder)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Case:
    # A real scanner's CT (512 x 512, JPEG 2000): what the end-to-end tests send.
    folder = tmp_path_factory.mktemp("ct-viewers")
    return _case(dicom_files(shared_data("ct-siemens-j2k")), folder)


@pytest.fixture(params=["synthetic", "real"])
def case(request: pytest.FixtureRequest) -> Case:
    result: Case = request.getfixturevalue(request.param)
    return result


def test_dcmjs_reads_seg_and_sr(case: Case) -> None:
    seg = run_loader("dcmjs-read.mjs", case.seg_path)
    ours = pydicom.dcmread(case.seg_path, stop_before_pixels=True)
    assert seg["sopClassUID"] == seg["normalizedSopClassUID"] == ours.SOPClassUID
    assert seg["numberOfFrames"] == ours.NumberOfFrames
    assert [s["label"] for s in seg["segments"]] == [s.label for s in SEGMENTS]
    sr = run_loader("dcmjs-read.mjs", case.sr_path)
    (measurements,) = [i for i in sr["content"] if i["concept"] == "DCM:126010"]
    groups = [g for g in measurements["children"] if g["concept"] == "DCM:125007"]
    assert len(groups) == 2 * len(case.located())


def test_cornerstone_labelmap_equals_highdicom(case: Case, tmp_path: Path) -> None:
    summary, labelmaps = cornerstone_labelmaps(case.seg_path, case.sources, tmp_path)
    assert summary["labelmaps"] == 1 and not summary["overlapping"]
    assert summary["segments"] == {str(s.number): s.label for s in SEGMENTS}
    assert_labelmaps_are_highdicoms(labelmaps, case.seg_path, case.sources)
    assert np.count_nonzero(labelmaps) == sum(m.voxel_count for m in case.measurements)


def test_cornerstone_spreads_overlapping_segments_over_labelmaps(
    synthetic: Case, tmp_path: Path
) -> None:
    # Models may give overlapping segments (a body and the organs in it).
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in synthetic.sources]
    masks = synthetic_masks(len(headers), int(headers[0].Rows), int(headers[0].Columns))
    masks[2] = masks[0] | masks[1]
    encoded = encode(headers, masks, 1.0)
    seg_path = tmp_path / "seg.dcm"
    encoded.seg.save_as(seg_path, enforce_file_format=True)
    summary, labelmaps = cornerstone_labelmaps(seg_path, synthetic.sources, tmp_path)
    assert summary["overlapping"] and summary["labelmaps"] > 1
    assert_labelmaps_are_highdicoms(labelmaps, seg_path, synthetic.sources)


def test_cornerstone_reads_each_segment_point(case: Case) -> None:
    result = run_loader("cornerstone-sr.mjs", case.sr_path, *case.sources)
    located = case.located()
    # The TID 1410 point groups become Probe annotations on the source image.
    probes = result["tools"].pop("Probe")
    assert result["tools"] == {}
    assert len(probes) == len(located)
    assert all(p["referencedImageId"] and p["points"] == 1 for p in probes)
    # Cornerstone3D reads measurement groups with coordinates only: it logs and skips each
    # TID 1411 group, which refers to its segment instead (adapters 5.14: isValidMeasurement
    # assumes an SCOORD in every group).
    assert len(result["failures"]) == len(located)
    assert all("reading 'ValueType'" in failure for failure in result["failures"])


def test_ohif_loads_sr_with_every_measurement_labelled(case: Case) -> None:
    result = run_loader("ohif-sr.cjs", case.sr_path, *case.sources)
    assert result["handler"] == "dicom-sr" and result["displaySets"] == 1
    assert result["isImagingMeasurementReport"]
    assert result["loadError"] is None
    assert result["isLoaded"]
    assert result["warnings"] == [] and result["notifications"] == []
    measurements = result["measurements"]
    located = case.located()
    assert [m["trackingIdentifier"] for m in measurements] == [s.tracking_id for s, _ in located]
    for (spec, measured), shown in zip(located, measurements, strict=True):
        labels = {label["label"]: label["value"] for label in shown["labels"]}
        volume, unit = labels["Volume"].split(" ")
        assert (float(volume), unit) == (pytest.approx(measured.volume_ml, abs=0.0051), "cm3")
        mean, unit = labels["Attenuation Coefficient"].split(" ")
        assert (float(mean), unit) == (pytest.approx(measured.mean_hu, abs=0.0051), "[hnsf'U]")
        # OHIF labels an SCT Finding Site by its code value.
        anatomic = spec.category.value == "91723000"
        assert labels.get("363698007") == (spec.type.meaning if anatomic else None)
        # Placed on the source series: OHIF shows it there, with these labels.
        assert shown["loaded"] and shown["displaySetInstanceUID"] == "source-display-set"
        (coord,) = shown["coords"]
        assert coord["valueType"] == "SCOORD" and coord["graphicType"] == "POINT"
    assert len(result["annotations"]) == len(located)
