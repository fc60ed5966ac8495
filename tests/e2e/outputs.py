"""Read the SEG and SR the agent stored in Orthanc back, and check them as a PACS user would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from agent.dicom.codes import VOLUME, coded
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.orthanc import Orthanc
from tests.support.pixelmed import assert_seg_valid, assert_sr_valid


@dataclass(frozen=True)
class Outputs:
    seg: hd.seg.Segmentation
    sr: hd.sr.Comprehensive3DSR
    seg_path: Path
    sr_path: Path

    def seg_volumes_ml(self) -> dict[str, float]:
        """Per segment label: frames' foreground pixels x voxel volume."""
        pixels = self.seg.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        shared = self.seg.SharedFunctionalGroupsSequence[0]
        measures = shared.PixelMeasuresSequence[0]
        dy, dx = (float(v) for v in measures.PixelSpacing)
        dz = float(measures.SpacingBetweenSlices)
        counts: dict[int, int] = {}
        for frame, item in zip(pixels, self.seg.PerFrameFunctionalGroupsSequence, strict=True):
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            counts[number] = counts.get(number, 0) + int(np.count_nonzero(frame))
        return {
            str(self.seg.get_segment_description(n).SegmentLabel): counts.get(n, 0)
            * dx
            * dy
            * dz
            / 1000
            for n in self.seg.get_segment_numbers()
        }

    def sr_volumes_ml(self) -> dict[str, float]:
        report = self.sr.content
        assert isinstance(report, hd.sr.MeasurementReport)
        result = {}
        labels = {
            n: str(self.seg.get_segment_description(n).SegmentLabel)
            for n in self.seg.get_segment_numbers()
        }
        for group in report.get_volumetric_roi_measurement_groups():
            segment = group.referenced_segment
            assert segment is not None
            reference = segment[0].ReferencedSOPSequence[0]
            assert reference.ReferencedSOPInstanceUID == self.seg.SOPInstanceUID
            number = int(reference.ReferencedSegmentNumber)
            (volume,) = group.get_measurements(name=coded(VOLUME))
            result[labels[number]] = float(volume.value)
        return result


def fetch_outputs(
    orthanc: Orthanc, study_uid: str, source_series_uid: str, source_sops: set[str], folder: Path
) -> Outputs:
    """Download the study's non-source instances: exactly one SEG and one SR, both valid."""
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None, "study not in the PACS"
    found: dict[str, list[Path]] = {"SEG": [], "SR": []}
    folder.mkdir(parents=True, exist_ok=True)
    for item in orthanc.study_instances(study_id):
        sop = item["MainDicomTags"]["SOPInstanceUID"]
        if sop in source_sops:
            continue
        path = folder / f"{sop}.dcm"
        path.write_bytes(orthanc.download_instance(item["ID"]))
        found.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).Modality), []).append(
            path
        )
    assert len(found["SEG"]) == 1, f"expected one SEG, got {found}"
    assert len(found["SR"]) == 1, f"expected one SR, got {found}"
    assert set(found) == {"SEG", "SR"}, f"unexpected objects in the study: {found}"
    seg_path, sr_path = found["SEG"][0], found["SR"][0]
    assert_dciodvfy_clean(seg_path)
    assert_dciodvfy_clean(sr_path)
    assert_seg_valid(seg_path)
    assert_sr_valid(sr_path)

    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    for obj in (seg, sr):
        assert obj.StudyInstanceUID == study_uid
        assert obj.SeriesInstanceUID != source_series_uid
        assert "AI" in obj.SeriesDescription
    assert seg.SegmentationType == "BINARY"
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == source_series_uid
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence}
    assert referenced <= source_sops and referenced
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study_uid
    return Outputs(seg, sr, seg_path, sr_path)
