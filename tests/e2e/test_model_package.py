"""End to end with a model package: the example U-Net, configured by path, runs on the CPU in
`serve` and its SEG and SR reach Orthanc coded as its manifest says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from agent.db.states import State
from agent.dicom.codes import ATTENUATION_COEFFICIENT, VOLUME, coded
from agent.models.package import load_package
from tests.e2e.outputs import fetch_outputs
from tests.models.packages import unet, write_exported
from tests.support.agent import serving_agent, wait_for_study
from tests.support.dcmtk import storescu
from tests.support.orthanc import Orthanc
from tests.support.phantom import write_phantom_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        yield pacs


def test_packaged_unet_end_to_end(orthanc: Orthanc, tmp_path: Path) -> None:
    package = write_exported(tmp_path / "tiny-unet", unet())
    identity = load_package(package).identity
    truth = write_phantom_series(tmp_path / "ct", slices=40)
    extra = f'[[models]]\nname = "tiny-unet"\npackage = "{package}"\n'
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    with serving_agent(tmp_path / "agent", destinations=[destination], extra=extra) as (
        agent,
        db,
        port,
    ):
        storescu(list(truth.files), port=port, called_aet="PACS_AGENT")
        first = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        done = wait_for_study(db, study_uid, {State.DONE, State.FAILED}, 240.0, agent.log_tail)
        assert done.state == State.DONE, f"{done.reason}\n{agent.log_tail()}"
        log = agent.log_path.read_text()
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in truth.files}
    out = fetch_outputs(orthanc, study_uid, series_uid, sops, tmp_path / "out")

    # Loaded once at start, on the CPU with a warning (there is no GPU here).
    assert log.count("loaded from") == 1
    assert "model tiny-unet ready on cpu" in log
    assert "no CUDA device here; running on the CPU" in log

    seg = out.seg
    labels = {n: seg.get_segment_description(n) for n in seg.get_segment_numbers()}
    assert [str(d.SegmentLabel) for d in labels.values()] == ["Liver", "Spleen"]
    assert [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in labels.values()] == [
        "10200004",
        "78961009",
    ]
    assert all(len(d.RecommendedDisplayCIELabValue) == 3 for d in labels.values())
    algorithm = labels[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny-unet", "0.1.0")
    assert seg.ImageComments == "research use, not for diagnosis"
    # The Device UID derives from the weights' SHA-256 (IHE AIR Contributing Equipment).
    devices = {str(item.get("DeviceUID", "")) for item in seg.ContributingEquipmentSequence}
    assert identity.device_uid in devices

    # The manifest asks for volume and mean for the liver, volume only for the spleen.
    report = out.sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    names: dict[int, set[str]] = {}
    for group in report.get_volumetric_roi_measurement_groups():
        number = int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        names[number] = {str(m.name.meaning) for m in group.get_measurements()}
    # A segment without voxels has no group but is named in a Comment, unless all are empty.
    volumes = out.seg_volumes_ml()
    texts = " ".join(str(i.TextValue) for i in out.sr.ContentSequence if i.ValueType == "TEXT")
    for number, label in ((1, "Liver"), (2, "Spleen")):
        if volumes[label] > 0 or not any(volumes.values()):
            assert coded(VOLUME).meaning in names[number], label
        else:
            assert number not in names and "volume 0 ml: " in texts and f"{label} (" in texts
    if volumes["Liver"] > 0:
        assert coded(ATTENUATION_COEFFICIENT).meaning in names[1]
    if 2 in names:
        assert names[2] == {coded(VOLUME).meaning}
