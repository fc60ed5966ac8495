"""build_sr: TID 1500 content that references the SEG, carries the inputs, and validates."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from agent.dicom.codes import (
    ATTENUATION_COEFFICIENT,
    COMMENT,
    CT_PROCEDURE,
    CUBIC_CENTIMETER,
    HOUNSFIELD_UNIT,
    MEAN,
    PROCESSING_ALGORITHM,
    VOLUME,
    coded,
)
from agent.dicom.uids import OutputUids
from agent.domain import Code, Measurement, ModelIdentity, SegmentSpec
from agent.encode.equipment import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from agent.encode.seg import tracking_uid
from agent.encode.sr import build_sr
from agent.errors import PermanentError
from tests.encode import (
    DISCLAIMER,
    PIXEL_SPACING_MM,
    SEGMENTS,
    SLICE_THICKNESS_MM,
    SYNTHETIC_SIZE,
    empty_segments_comment,
    encode,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.data import dicom_files, shared_data
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.pixelmed import assert_sr_valid


@dataclass(frozen=True)
class Built:
    headers: list[Dataset]
    seg: hd.seg.Segmentation
    measurements: list[Measurement]
    model: ModelIdentity
    uids: OutputUids
    path: Path


def _build(headers: list[Dataset], masks: np.ndarray, voxel_ml: float, out: Path) -> Built:
    encoded = encode(headers, masks, voxel_ml)
    encoded.sr.save_as(out, enforce_file_format=True)
    return Built(headers, encoded.seg, encoded.measurements, encoded.model, encoded.uids, out)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Built:
    folder = tmp_path_factory.mktemp("synthetic-sr")
    headers = read_headers(write_synthetic_ct(folder / "ct"))
    masks = synthetic_masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    voxel_ml = PIXEL_SPACING_MM**2 * SLICE_THICKNESS_MM / 1000.0
    return _build(headers, masks, voxel_ml, folder / "sr.dcm")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Built:
    headers = read_headers(dicom_files(shared_data("dcmqi", "ct-3slice")))
    masks = synthetic_masks(len(headers), int(headers[0].Rows), int(headers[0].Columns))
    spacing = [float(v) for v in headers[0].PixelSpacing]
    voxel_ml = spacing[0] * spacing[1] * float(headers[0].SliceThickness) / 1000.0
    return _build(headers, masks, voxel_ml, tmp_path_factory.mktemp("real-sr") / "sr.dcm")


@pytest.fixture(params=["synthetic", "real"])
def built(request: pytest.FixtureRequest) -> Built:
    result: Built = request.getfixturevalue(request.param)
    return result


def _is(concept: hd.sr.CodedConcept | None, code: Code) -> bool:
    return concept is not None and (concept.value, concept.scheme_designator) == (
        code.value,
        code.scheme,
    )


def _report(sr: object) -> hd.sr.MeasurementReport:
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def test_sr_is_in_source_study_with_new_series(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    source = built.headers[0]
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID == built.uids.sr_series
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, built.uids.seg_series)
    assert sr.SOPInstanceUID == built.uids.sr_instance
    assert sr.PatientName == source.PatientName
    assert sr.PatientID == source.PatientID
    assert sr.SeriesNumber == 9902
    assert sr.InstanceNumber == 1
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"


def test_sr_is_a_tid_1500_report_with_device_observer(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    root = sr.ContentSequence
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    procedures = [
        item.ConceptCodeSequence[0]
        for item in root
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value
    ]
    assert [(p.CodeValue, p.CodingSchemeDesignator) for p in procedures] == [
        (CT_PROCEDURE.value, CT_PROCEDURE.scheme)
    ]
    observers = _report(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    assert len(observers) == 1
    attributes = observers[0].observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == built.model.device_uid
    assert attributes.name == built.model.name
    assert attributes.manufacturer_name == built.model.manufacturer
    assert attributes.model_name == built.model.name
    comments = [
        item.TextValue
        for item in root
        if item.ConceptNameCodeSequence[0].CodeValue == COMMENT.value and item.ValueType == "TEXT"
    ]
    pairs = zip(SEGMENTS, built.measurements, strict=True)
    empty = [spec for spec, m in pairs if not m.voxel_count]
    assert empty, "the inputs should have an empty segment"
    assert comments == [DISCLAIMER, empty_segments_comment(empty)]


def test_sr_groups_reference_seg_segments(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    groups = _report(sr).get_volumetric_roi_measurement_groups()
    located = _located(built)
    assert len(groups) == len(located)
    for spec, group in zip(located, groups, strict=True):
        segment = group.referenced_segment
        assert segment is not None
        reference = segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == built.seg.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == pydicom.uid.SegmentationStorage
        assert reference.ReferencedSegmentNumber == spec.number
        series = [item for item in segment if item.ValueType == "UIDREF"]
        assert [item.UID for item in series] == [built.headers[0].SeriesInstanceUID]
        assert group.tracking_uid == tracking_uid(built.uids, spec.number)
        assert group.tracking_uid == built.seg.get_segment_description(spec.number).tracking_uid
        assert group.tracking_identifier == spec.tracking_id
        assert _is(group.finding_type, spec.type)
        assert _is(group.finding_category, spec.category)
        # Anatomical structures name their own site; tissue classes do not.
        sites = [site.value for site in group.finding_sites]
        if spec.category.value == "91723000":
            assert len(sites) == 1 and _is(sites[0], spec.type)
        else:
            assert sites == []


def test_sr_measurements_equal_inputs(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    groups = _report(sr).get_volumetric_roi_measurement_groups()
    located = [m for m in built.measurements if m.voxel_count]
    for measured, group in zip(located, groups, strict=True):
        volumes = group.get_measurements(name=coded(VOLUME))
        assert len(volumes) == 1
        assert volumes[0].value == measured.volume_ml
        assert _is(volumes[0].unit, CUBIC_CENTIMETER)
        means = group.get_measurements(name=coded(ATTENUATION_COEFFICIENT))
        assert len(means) == 1
        assert means[0].value == measured.mean_hu
        assert _is(means[0].unit, HOUNSFIELD_UNIT)
        assert _is(means[0].derivation, MEAN)


def test_sr_records_evidence_in_current_procedure(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == built.headers[0].StudyInstanceUID
    referenced = {
        sop.ReferencedSOPInstanceUID
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in built.headers} | {built.seg.SOPInstanceUID}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_sr_says_it_is_ai_and_has_air_equipment(built: Built) -> None:
    sr = hd.sr.srread(built.path)
    assert len(sr.SeriesDescription) <= 64
    assert sr.SeriesDescription.startswith(f"AI {built.model.name} SR")
    assert "not for diagnosis" in sr.SeriesDescription
    air = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]
    assert len(air) == 1
    assert air[0].DeviceUID == built.model.device_uid
    assert str(sr.ContentDate) == str(built.seg.ContentDate)
    assert str(sr.ContentTime) == str(built.seg.ContentTime)


def test_sr_passes_dciodvfy(built: Built) -> None:
    assert_dciodvfy_clean(built.path)


def _sr_for(
    built: Built,
    measured: list[Measurement] | None = None,
    *,
    headers: list[Dataset] | None = None,
    instance_number: int = 1,
    segments: Sequence[SegmentSpec] = SEGMENTS,
) -> hd.sr.Comprehensive3DSR:
    """An SR over `built`'s SEG, with other measurements, source headers, instance number or
    segment specs."""
    return build_sr(
        built.headers if headers is None else headers,
        built.seg,
        segments,
        built.measurements if measured is None else measured,
        built.model,
        built.uids,
        instance_number=instance_number,
        disclaimer=DISCLAIMER,
    )


def test_awkward_floats_survive(synthetic: Built, tmp_path: Path) -> None:
    # DS holds 16 characters; highdicom adds the exact FD value when DS would round.
    measured = [
        Measurement(1, 1 / 3, -1 / 7, 5),
        Measurement(2, 123456.123456789, 1e-9, 1),
        Measurement(3, 0.0, float("nan"), 0),
    ]
    sr = _sr_for(synthetic, measured)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    groups = _report(hd.sr.srread(tmp_path / "sr.dcm")).get_volumetric_roi_measurement_groups()
    for m, group in zip(measured[:2], groups, strict=True):
        assert group.get_measurements(name=coded(VOLUME))[0].value == m.volume_ml
        assert group.get_measurements(name=coded(ATTENUATION_COEFFICIENT))[0].value == m.mean_hu
    assert_dciodvfy_clean(tmp_path / "sr.dcm")
    assert_sr_valid(tmp_path / "sr.dcm")


@pytest.mark.parametrize(
    "measured",
    [
        [Measurement(1, 1.0, 0.0, 1), Measurement(2, 1.0, 0.0, 1)],
        [Measurement(1, 1.0, 0.0, 1), Measurement(2, 1.0, 0.0, 1), Measurement(2, 1.0, 0.0, 1)],
        [
            Measurement(1, 1.0, float("nan"), 1),
            Measurement(2, 1.0, 0.0, 1),
            Measurement(3, 0, 0, 0),
        ],
        [Measurement(1, -1.0, 0.0, 1), Measurement(2, 1.0, 0.0, 1), Measurement(3, 0, 0, 0)],
        # Voxels measured where the SEG has none, and none where it has some.
        [Measurement(1, 1.0, 0.0, 1), Measurement(2, 1.0, 0.0, 1), Measurement(3, 1.0, 0.0, 4)],
        [
            Measurement(1, 0.0, float("nan"), 0),
            Measurement(2, 1.0, 0.0, 1),
            Measurement(3, 0, 0, 0),
        ],
    ],
)
def test_build_sr_rejects_inconsistent_measurements(
    synthetic: Built, measured: list[Measurement]
) -> None:
    with pytest.raises(PermanentError) as error:
        _sr_for(synthetic, measured)
    assert synthetic.headers[0].PatientID not in str(error.value)


def _located(built: Built) -> list[SegmentSpec]:
    """The segments with voxels: those that have measurement groups when some segment does."""
    return [s for s, m in zip(SEGMENTS, built.measurements, strict=True) if m.voxel_count]


def test_each_segment_with_voxels_has_a_point_in_it(built: Built) -> None:
    # TID 1410 groups of the same findings: one pixel of each segment on a source image, for
    # viewers that show measurements at a place.
    sr = hd.sr.srread(built.path)
    planar = _report(sr).get_planar_roi_measurement_groups()
    located = _located(built)
    assert len(planar) == len(located)
    sources = {str(ds.SOPInstanceUID): ds for ds in built.headers}
    for spec, group in zip(located, planar, strict=True):
        assert group.tracking_uid == tracking_uid(built.uids, spec.number)
        assert group.tracking_identifier == spec.tracking_id
        assert _is(group.finding_type, spec.type)
        assert group.get_measurements() == []
        region = group.roi
        assert region is not None
        assert region.GraphicType == "POINT"
        (image,) = [item for item in region.ContentSequence if item.ValueType == "IMAGE"]
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID in sources
        x, y = (float(v) for v in region.GraphicData)
        column, row = int(x), int(y)
        assert (x - column, y - row) == (0.5, 0.5)  # the pixel's centre
        # The pixel is in the segment, on the SEG frame derived from that image.
        frames = [
            index + 1
            for index, item in enumerate(built.seg.PerFrameFunctionalGroupsSequence)
            if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == spec.number
            and item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            == reference.ReferencedSOPInstanceUID
        ]
        assert len(frames) == 1
        assert built.seg.get_stored_frame(frames[0])[row, column] == 1


def test_when_every_segment_is_empty_each_keeps_a_volume_of_zero(
    synthetic: Built, tmp_path: Path
) -> None:
    # TID 1500 needs a measurement group; with no voxels there is no place to point to.
    masks = np.zeros((len(SEGMENTS), len(synthetic.headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE), bool)
    encoded = encode(synthetic.headers, masks, 1.0)
    encoded.sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = _report(hd.sr.srread(tmp_path / "sr.dcm"))
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [s.tracking_id for s in SEGMENTS]
    for group in groups:
        assert [m.value for m in group.get_measurements()] == [0.0]
    assert report.get_planar_roi_measurement_groups() == []
    assert_dciodvfy_clean(tmp_path / "sr.dcm")


def test_build_sr_wants_the_images_the_seg_was_derived_from(synthetic: Built) -> None:
    with pytest.raises(PermanentError, match="not those the SEG was derived from"):
        _sr_for(synthetic, headers=synthetic.headers[1:])


@pytest.mark.parametrize("revision", [2, 17])
def test_sr_carries_the_revision_as_instance_number(synthetic: Built, revision: int) -> None:
    sr = _sr_for(synthetic, instance_number=revision)
    assert sr.InstanceNumber == revision
    with pytest.raises(PermanentError, match="instance number"):
        _sr_for(synthetic, instance_number=0)


def _measured_names(sr: hd.sr.Comprehensive3DSR, folder: Path) -> list[set[str]]:
    """The concepts each measurement group of `sr` holds, as a PACS reads them back."""
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    groups = _report(hd.sr.srread(folder / "sr.dcm")).get_volumetric_roi_measurement_groups()
    return [{m.name.value for m in group.get_measurements()} for group in groups]


def test_each_segment_reports_what_its_spec_asks(synthetic: Built, tmp_path: Path) -> None:
    # A package's outputs choose their measurements; here the second wants its volume only.
    specs = [
        dataclasses.replace(spec, measurements=("volume",)) if spec.number == 2 else spec
        for spec in SEGMENTS
    ]
    (tmp_path / "default").mkdir()
    default = _measured_names(_sr_for(synthetic), tmp_path / "default")
    names = _measured_names(_sr_for(synthetic, segments=specs), tmp_path)
    assert default[1] == {VOLUME.value, ATTENUATION_COEFFICIENT.value}
    assert names[1] == {VOLUME.value}
    assert names[:1] + names[2:] == default[:1] + default[2:]


def test_a_mean_in_hu_is_reported_for_ct_only(synthetic: Built, tmp_path: Path) -> None:
    mr = [copy.deepcopy(ds) for ds in synthetic.headers]
    for ds in mr:
        ds.Modality = "MR"
    names = _measured_names(_sr_for(synthetic, headers=mr), tmp_path)
    assert names and all(n == {VOLUME.value} for n in names)


def _procedures(sr: Dataset) -> list[tuple[str, str, str]]:
    return [
        (p.CodeValue, p.CodingSchemeDesignator, p.CodeMeaning)
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value
        for p in item.ConceptCodeSequence
    ]


def test_procedure_reported_is_that_of_the_source_modality(synthetic: Built) -> None:
    # TID 1500 Procedure Reported from CID 100: an MR is not reported as a CT.
    mr = [copy.deepcopy(ds) for ds in synthetic.headers]
    for ds in mr:
        ds.Modality = "MR"
    assert _procedures(_sr_for(synthetic)) == [("25045-6", "LN", "CT unspecified body region")]
    assert _procedures(_sr_for(synthetic, headers=mr)) == [
        ("25056-3", "LN", "MRI unspecified body region")
    ]


def test_sr_concept_names_are_spelled_as_ps3_16(synthetic: Built) -> None:
    def items(ds: Dataset) -> Iterator[Dataset]:
        for item in ds.get("ContentSequence", []):
            yield item
            yield from items(item)

    names = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodeMeaning)
        for item in items(pydicom.dcmread(synthetic.path))
    }
    source_series = codes.DCM.SourceSeriesForSegmentation
    assert (source_series.value, source_series.meaning) in names
    assert (source_series.value, "Source Series for Segmentation") not in names


def test_sr_file_meta_names_pacs_agent(synthetic: Built) -> None:
    meta = pydicom.dcmread(synthetic.path, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_sr_passes_pixelmed(built: Built) -> None:
    assert_sr_valid(built.path)
