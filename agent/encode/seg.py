"""Encode model masks as a BINARY DICOM Segmentation in the source study, deterministically."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from agent.dicom.codes import ARTIFICIAL_INTELLIGENCE, coded
from agent.dicom.uids import OutputUids, derive_uid
from agent.domain import ModelIdentity, SegmentSpec
from agent.encode import equipment
from agent.errors import PermanentError

# PS3.3 C.8.20.2 Content Label is CS (PS3.5: upper case, digits, space, "_"; at most 16).
_CONTENT_LABEL = "AI_SEGMENTATION"
_CONTENT_DESCRIPTION = "AI segmentation - research use, not for diagnosis"


def build_seg(
    source: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[SegmentSpec],
    model: ModelIdentity,
    uids: OutputUids,
    *,
    series_number: int = 9901,
    disclaimer: str,
    created: datetime.datetime | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG for `masks` (bool, (n_segments, z, y, x)) over the slices in `source`.

    `source` are the headers of the single-frame source slices in slice order; pixel data is
    not needed (highdicom takes geometry from Image Position/Orientation and Pixel Spacing).
    The object is a BINARY Segmentation Storage instance, not a Label Map Segmentation
    (1.2.840.10008.5.1.4.1.1.66.7, which Orthanc 1.10 refuses), in the source study with the
    series and instance UIDs of `uids`.

    Every SegmentSpec becomes the segment of the same number, even if its mask is empty:
    segment numbers then always match the model's label map and the SR, and a segment
    without frames is valid (PS3.3 C.8.20.2 asks for no frame per segment). Empty frames are
    omitted. If every mask is empty, a SEG still needs at least one frame, and highdicom would
    then keep all segments x slices empty frames (gigabytes for a full CT and many segments);
    the SEG is then built over the first slice only: one empty frame per segment.

    `created` sets the content and creation date/time; by default they derive from the
    source (`equipment.creation_timestamp`), so the same inputs give byte-identical output.
    """
    _check_inputs(source, masks, segments)
    when = created if created is not None else equipment.creation_timestamp(source)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=coded(ARTIFICIAL_INTELLIGENCE),
        version=model.version,
        source=model.manufacturer,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=spec.number,
            segment_label=spec.label,
            segmented_property_category=coded(spec.category),
            segmented_property_type=coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=spec.tracking_id,
            tracking_uid=tracking_uid(uids, spec.number),
        )
        for spec in segments
    ]
    headers = [equipment.highdicom_source(source[0]), *source[1:]]
    found = bool(masks.any())
    if not found:
        headers, masks = headers[:1], masks[:, :1]
    seg = hd.seg.Segmentation(
        source_images=headers,
        # highdicom wants segments stacked on the last axis: (frames, rows, columns, segments).
        pixel_array=np.moveaxis(masks, 0, -1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series,
        series_number=series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=equipment.MANUFACTURER,
        manufacturer_model_name=equipment.MODEL_NAME,
        software_versions=equipment.SOFTWARE_VERSION,
        device_serial_number=equipment.DEVICE_SERIAL_NUMBER,
        content_description=_CONTENT_DESCRIPTION,
        content_label=_CONTENT_LABEL,
        omit_empty_frames=found,
        series_description=equipment.series_description(model, "SEG"),
        content_date=equipment.content_date(when),
        content_time=equipment.content_time(when),
        series_date=equipment.content_date(when),
        series_time=equipment.content_time(when),
        coding_schemes=equipment.coding_schemes(),
    )
    equipment.stamp_instance(seg, source, model, when)
    # highdicom mints a random Dimension Organization UID (PS3.3 C.7.6.17); derive it instead.
    _replace_dimension_organization_uid(seg, derive_uid(uids.seg_instance, "dimension-org"))
    # PS3.3 C.7.6.1 Image Comments (LT) holds the full disclaimer; Content Description is LO.
    seg.ImageComments = disclaimer
    return seg


def tracking_uid(uids: OutputUids, segment_number: int) -> str:
    """The Tracking UID of one segment; the SEG and the SR must carry the same value."""
    return derive_uid(uids.seg_instance, "tracking", str(segment_number))


def _check_inputs(
    source: Sequence[Dataset], masks: np.ndarray, segments: Sequence[SegmentSpec]
) -> None:
    if not source:
        raise PermanentError("no source images to build a SEG from")
    if masks.dtype != np.bool_ or masks.ndim != 4:
        raise PermanentError(
            f"masks must be bool with shape (segments, z, y, x), got {masks.dtype} {masks.shape}"
        )
    if masks.shape[0] != len(segments):
        raise PermanentError(f"{masks.shape[0]} masks for {len(segments)} segments")
    numbers = [spec.number for spec in segments]
    if numbers != list(range(1, len(segments) + 1)):
        # PS3.3 C.8.20.2: BINARY segments are numbered from 1; highdicom also wants them in order.
        raise PermanentError(f"segment numbers must be 1..{len(segments)} in order, got {numbers}")
    rows, columns = int(source[0].Rows), int(source[0].Columns)
    if masks.shape[1:] != (len(source), rows, columns):
        raise PermanentError(
            f"masks shape {masks.shape[1:]} does not match the source"
            f" ({len(source)}, {rows}, {columns})"
        )


def _replace_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = uid
