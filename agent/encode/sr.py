"""Encode per-segment measurements as a TID 1500 Measurement Report that references the SEG."""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from agent.dicom.codes import (
    ANATOMICAL_STRUCTURE,
    ARTIFICIAL_INTELLIGENCE,
    ATTENUATION_COEFFICIENT,
    COMMENT,
    CUBIC_CENTIMETER,
    HOUNSFIELD_UNIT,
    LEGACY_ANATOMICAL_STRUCTURE,
    MEAN,
    SOURCE_SERIES_FOR_SEGMENTATION,
    VOLUME,
    coded,
    procedure_reported,
)
from agent.dicom.uids import OutputUids
from agent.domain import Code, Measurement, ModelIdentity, SegmentSpec
from agent.encode import charset, equipment
from agent.encode.seg import tracking_uid
from agent.encode.sr_points import RepresentativePoint, representative_points
from agent.errors import PermanentError

# Either coding of "Anatomical Structure" means the segment's type names a body part.
_ANATOMIC_CATEGORIES = {
    (code.value, code.scheme) for code in (ANATOMICAL_STRUCTURE, LEGACY_ANATOMICAL_STRUCTURE)
}


def build_sr(
    source: Sequence[Dataset],
    seg: hd.seg.Segmentation,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[Measurement],
    model: ModelIdentity,
    uids: OutputUids,
    *,
    instance_number: int,
    series_number: int = 9902,
    disclaimer: str,
    created: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR (TID 1500) for `measurements` of the segments of `seg`.

    One TID 1411 Volumetric ROI measurement group per segment with voxels, referencing the
    segment of `seg` and the source series, with tracking identifier and UID equal to the
    SEG's, the segment's category and type as finding category and type (and as finding site
    for anatomical structures), Volume in cm3 and (CT only) mean attenuation in HU; followed by
    a TID 1410 group of the same finding whose Image Region is a representative point: a pixel
    of the segment on its largest cross-section. Empty segments are named in a Comment with
    their volume of 0; if every segment is empty, each keeps a TID 1411 group with volume 0
    and no mean (which is undefined), as TID 1500 needs one measurement group.

    `source` are the headers of the images `seg` was derived from, as for `build_seg` (one
    multi-frame image or single-frame images); they are the report's evidence, with `seg`.
    `instance_number` is the result's revision, as for `build_seg`. `created` as for
    `build_seg`; by default derived from the source, for identical repeats.
    """
    by_number = _check_inputs(source, seg, segments, measurements)
    equipment.check_instance_number(instance_number)
    when = equipment.creation_time(created, source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=coded(ARTIFICIAL_INTELLIGENCE),
        manufacturer=model.manufacturer,
    )
    source_series = hd.sr.SourceSeriesForSegmentation(source[0].SeriesInstanceUID)
    # highdicom capitalises this concept name; write it as PS3.16 does.
    source_series.ConceptNameCodeSequence[0].CodeMeaning = SOURCE_SERIES_FOR_SEGMENTATION.meaning
    # A mean is an attenuation in HU only for CT (PS3.3 C.8.2.1: Rescale Type HU); other
    # modalities' pixel values have no standard unit, so their SR reports volumes only.
    attenuation = str(source[0].get("Modality", "")) == "CT"
    # --- measurement groups: one TID 1411 per segment with voxels, and its location ---
    # Viewers that show measurements at a place (OHIF) read a group's values only together
    # with image coordinates, which TID 1411 allows only instead of the Referenced Segment
    # (rows 5, 7 and 10 are exclusive). A second group, TID 1410 with the same tracking
    # identifier and UID, marks a representative point of the segment; viewers merge the two
    # by Tracking Unique Identifier. An empty segment has no place: its volume of 0 ml is
    # stated in a Comment, unless every segment is empty (TID 1500 needs a measurement group).
    points = representative_points(seg)
    _check_points(points, measurements)
    located = [spec for spec in segments if spec.number in points] or list(segments)
    groups: list[_Group] = []
    for spec in located:
        groups.append(
            _measurement_group(
                spec, by_number[spec.number], seg, uids, algorithm, source_series, attenuation
            )
        )
        if spec.number in points:
            groups.append(_location_group(spec, points[spec.number], uids, algorithm))
    empty = [spec for spec in segments if spec not in located]
    # --- end of measurement groups ---
    # TID 1001 observer context: the model is the device observer (TID 1004).
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=model.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(procedure_reported(str(source[0].get("Modality", "")))),
        imaging_measurements=groups,
    )
    # TID 1500 is extensible: the disclaimer travels inside the report as a Comment.
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=coded(COMMENT),
            value=disclaimer,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    if empty:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=coded(COMMENT),
                value=_empty_segments_comment(empty),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[equipment.highdicom_source(source[0]), *source[1:], seg],
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=instance_number,
        manufacturer=equipment.MANUFACTURER,
        # COMPLETE: the report holds every result; UNVERIFIED and PRELIMINARY: no person has
        # confirmed it and it is not the definitive report (PS3.3 C.17.2, SR Document General).
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=equipment.series_description(model, "SR"),
        manufacturer_model_name=equipment.MODEL_NAME,
        software_versions=equipment.SOFTWARE_VERSION,
        device_serial_number=equipment.DEVICE_SERIAL_NUMBER,
        # Series Date/Time are left out (type 3): the series holds every revision.
        content_date=equipment.content_date(when),
        content_time=equipment.content_time(when),
        coding_schemes=equipment.coding_schemes(),
        specific_character_set=charset.BUILD_CHARACTER_SET,
    )
    equipment.stamp_instance(sr, source, model, when)
    return sr


def _measurement_group(
    spec: SegmentSpec,
    measurement: Measurement,
    seg: hd.seg.Segmentation,
    uids: OutputUids,
    algorithm: hd.sr.AlgorithmIdentification,
    source_series: hd.sr.SourceSeriesForSegmentation,
    attenuation: bool,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    # The algorithm is identified once per group (TID 1411 includes TID 4019), not per item.
    items: list[hd.sr.Measurement] = []
    if "volume" in spec.measurements:
        items.append(
            hd.sr.Measurement(
                name=coded(VOLUME),
                value=measurement.volume_ml,
                unit=coded(CUBIC_CENTIMETER),
            )
        )
    if attenuation and "mean" in spec.measurements and measurement.voxel_count > 0:
        items.append(
            hd.sr.Measurement(
                name=coded(ATTENUATION_COEFFICIENT),
                value=measurement.mean_hu,
                unit=coded(HOUNSFIELD_UNIT),
                derivation=coded(MEAN),
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=spec.number,
            source_series=source_series,
        ),
        measurements=items,
        **_finding(spec, uids, algorithm),
    )


def _finding(
    spec: SegmentSpec, uids: OutputUids, algorithm: hd.sr.AlgorithmIdentification
) -> dict[str, Any]:
    """What both groups of one segment say of it: the same finding, tracked by the SEG's
    tracking identifier and UID (viewers merge the groups by it), by the same algorithm."""
    return {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, spec.number), identifier=spec.tracking_id
        ),
        "finding_category": coded(spec.category),
        "finding_type": coded(spec.type),
        "finding_sites": [hd.sr.FindingSite(coded(spec.type))]
        if _is_anatomic(spec.category)
        else None,
        "algorithm_id": algorithm,
    }


_Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def _location_group(
    spec: SegmentSpec,
    point: RepresentativePoint,
    uids: OutputUids,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of the same finding: a pixel of the segment, on its source image.

    Its Geometric purpose of region would be (128140, DCM, "Representative point") of CID 219,
    which PixelMed's DicomSRValidator (2022) rejects: its CID 219 predates that code. The row
    is optional, and left out.
    """
    frames = [point.frame_number] if point.frame_number is not None else None
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            # The pixel's centre (PS3.3 C.18.6.1.1: column, row; pixel corners at integers).
            graphic_data=np.array([[point.column + 0.5, point.row + 0.5]]),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=point.sop_class_uid,
                referenced_sop_instance_uid=point.sop_instance_uid,
                referenced_frame_numbers=frames,
            ),
        ),
        **_finding(spec, uids, algorithm),
    )


def _empty_segments_comment(empty: Sequence[SegmentSpec]) -> str:
    names = "; ".join(f"{spec.label} ({spec.tracking_id})" for spec in empty)
    return f"No voxels segmented, volume 0 ml: {names}"


def _check_points(
    points: dict[int, RepresentativePoint], measurements: Sequence[Measurement]
) -> None:
    for m in measurements:
        if (m.voxel_count > 0) != (m.segment_number in points):
            # The SR's volumes and the SEG's frames come from the same masks.
            raise PermanentError(
                f"segment {m.segment_number}: {m.voxel_count} voxels measured, "
                f"{'some' if m.segment_number in points else 'none'} in the SEG"
            )


def _is_anatomic(category: Code) -> bool:
    return (category.value, category.scheme) in _ANATOMIC_CATEGORIES


def _check_inputs(
    source: Sequence[Dataset],
    seg: hd.seg.Segmentation,
    segments: Sequence[SegmentSpec],
    measurements: Sequence[Measurement],
) -> dict[int, Measurement]:
    if not source:
        raise PermanentError("no source images to build an SR from")
    if not segments:
        # TID 1500 needs at least one measurement group (highdicom enforces it).
        raise PermanentError("no segments to report")
    by_number = {m.segment_number: m for m in measurements}
    numbers = [spec.number for spec in segments]
    if len(by_number) != len(measurements) or sorted(by_number) != sorted(numbers):
        raise PermanentError(
            f"measurements for segments {sorted(by_number)} do not match segments {numbers}"
        )
    derived_from = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    }
    if derived_from != {str(ds.SOPInstanceUID) for ds in source}:
        # The report's evidence must be the images the SEG was derived from (PS3.3 C.17.2.3).
        raise PermanentError("the source images are not those the SEG was derived from")
    seg_numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    if not set(numbers) <= seg_numbers:
        raise PermanentError(f"segments {numbers} are not all in the SEG {sorted(seg_numbers)}")
    for m in measurements:
        if m.voxel_count < 0 or not math.isfinite(m.volume_ml) or m.volume_ml < 0:
            raise PermanentError(f"segment {m.segment_number}: invalid volume or voxel count")
        if m.voxel_count > 0 and not math.isfinite(m.mean_hu):
            raise PermanentError(f"segment {m.segment_number}: mean HU is not a finite number")
    return by_number
