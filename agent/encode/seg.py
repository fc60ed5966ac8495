"""Encode model masks as a BINARY or LABELMAP DICOM Segmentation in the source study."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from agent.dicom.codes import ARTIFICIAL_INTELLIGENCE, coded
from agent.dicom.uids import OutputUids, SegType, derive_uid
from agent.domain import ModelIdentity, SegmentSpec
from agent.encode import charset, equipment
from agent.encode.frames import (
    check_slice_order,
    frame_mapping,
    frame_plane,
    is_multiframe,
    number_of_frames,
    verify_frames,
)
from agent.errors import PermanentError

# PS3.3 C.8.20.2 Content Label is CS (PS3.5: upper case, digits, space, "_"; at most 16).
_CONTENT_LABEL = "AI_SEGMENTATION"
_CONTENT_DESCRIPTION = "AI segmentation - research use, not for diagnosis"
_SEGMENTATION_TYPES: dict[SegType, hd.seg.SegmentationTypeValues] = {
    "binary": hd.seg.SegmentationTypeValues.BINARY,
    "labelmap": hd.seg.SegmentationTypeValues.LABELMAP,
}
# PS3.3 C.7.6.1 Image Laterality: R, L, U (unpaired), B (both); C.7.3.1 Laterality: R, L.
_IMAGE_LATERALITIES = ("R", "L", "U", "B")


def build_seg(
    source: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[SegmentSpec],
    model: ModelIdentity,
    uids: OutputUids,
    *,
    frames: Sequence[tuple[int, int]] | None = None,
    instance_number: int,
    series_number: int = 9901,
    disclaimer: str,
    created: datetime.datetime | None = None,
    seg_type: SegType = "binary",
) -> hd.seg.Segmentation:
    """Build the SEG for `masks` (bool, (n_segments, z, y, x)) over the source frames.

    `frames[z] = (i, k)` says that slice z of the masks is the 0-based frame k of `source[i]`;
    the slices ascend along the slice normal (row x column direction), as `Volume.hu` does.
    `source` is either single-frame images, each one slice (None means `frames[z] = (z, 0)`),
    or one multi-frame image (Enhanced or Legacy Converted Enhanced CT/MR) whose frames, in
    any stored order, may hold more than the volume. Headers suffice: highdicom takes the
    geometry from Image Position/Orientation and Pixel Spacing or their functional groups.
    `seg_type` "binary" gives a Segmentation Storage instance (one frame per segment and
    slice); "labelmap" a Label Map Segmentation Storage instance (1.2.840.10008.5.1.4.1.1.66.7,
    PS3.3 A.51.6: one frame per slice holding segment numbers; fewer, smaller frames, and
    what current viewers prefer, but Orthanc 1.10 refuses it), which cannot hold overlapping
    segments (PermanentError). `uids` must be those `output_uids` gives for that type. The
    object is in the source study with the series and instance UIDs of `uids` and
    `instance_number` (the result's revision).

    Every SegmentSpec becomes the segment of the same number, even if its mask is empty:
    segment numbers then always match the model's label map and the SR, and a segment
    without frames is valid (PS3.3 C.8.20.2 asks for no frame per segment). Empty frames are
    omitted. If every mask is empty, a SEG still needs at least one frame, and highdicom would
    then keep all segments x slices empty frames (gigabytes for a full CT and many segments);
    the SEG is then built over the first slice only: one empty frame per segment.

    Before returning, every SEG frame is checked to lie where the source frame it references
    lies; PermanentError if not, so that a mismatched SEG is never written.

    `created` is when the result was made: the Content, Instance Creation and Contribution
    Date/Time (see `equipment.creation_time`; the pipeline passes the time it recorded at
    the first encoding, so a repeat is byte-identical). Without it they derive from the
    source (`equipment.creation_timestamp`), deterministically too.
    """
    _check_inputs(masks, segments)
    equipment.check_instance_number(instance_number)
    mapping = frame_mapping(source, frames, int(masks.shape[1]))
    _check_pixel_shape(source, masks)
    check_slice_order(source, mapping)
    when = equipment.creation_time(created, source)
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
            display_color=(
                None
                if spec.color_lab is None
                else hd.color.CIELabColor.from_dicom_value(spec.color_lab)
            ),
        )
        for spec in segments
    ]
    headers, pixels, positions = _highdicom_planes(source, mapping, masks)
    try:
        seg = hd.seg.Segmentation(
            source_images=[equipment.highdicom_source(headers[0]), *headers[1:]],
            pixel_array=pixels,
            plane_positions=positions,
            segmentation_type=_SEGMENTATION_TYPES[seg_type],
            segment_descriptions=descriptions,
            series_instance_uid=uids.seg_series,
            series_number=series_number,
            sop_instance_uid=uids.seg_instance,
            instance_number=instance_number,
            manufacturer=equipment.MANUFACTURER,
            manufacturer_model_name=equipment.MODEL_NAME,
            software_versions=equipment.SOFTWARE_VERSION,
            device_serial_number=equipment.DEVICE_SERIAL_NUMBER,
            content_description=_CONTENT_DESCRIPTION,
            content_label=_CONTENT_LABEL,
            omit_empty_frames=positions is None,
            series_description=equipment.series_description(model, "SEG"),
            # Series Date/Time are left out (type 3): the series holds every revision.
            content_date=equipment.content_date(when),
            content_time=equipment.content_time(when),
            coding_schemes=equipment.coding_schemes(),
            specific_character_set=charset.BUILD_CHARACTER_SET,
        )
    except ValueError as error:
        # highdicom's reasons are about geometry and structure, not patient values.
        raise PermanentError(f"cannot build a SEG over these source images: {error}") from error
    # highdicom mints a random Dimension Organization UID (PS3.3 C.7.6.17); derive it instead.
    _replace_dimension_organization_uid(seg, derive_uid(uids.seg_instance, "dimension-org"))
    # PS3.3 C.7.6.1 Image Comments (LT) holds the full disclaimer; Content Description is LO.
    seg.ImageComments = disclaimer
    # The SEG shows the source's body part, so it states the source's laterality as Image
    # Laterality (PS3.3 C.7.6.1, type 3: empty when unknown). With Image Laterality present,
    # the condition of the series' Laterality (C.7.3.1, type 2C: a paired body part and no
    # Image or Frame Laterality) is not met, and it is not sent (PS3.5 7.4.5).
    seg.ImageLaterality = _image_laterality(headers[0])
    equipment.stamp_instance(seg, headers, model, when)
    verify_frames(seg, source, mapping)
    return seg


def segments_overlap(masks: np.ndarray) -> bool:
    """Whether some voxel is in two segments of `masks` (bool, (segments, z, y, x)): then
    only a BINARY SEG can hold them (PS3.3 C.8.20.2: a LABELMAP pixel has one segment)."""
    covered = np.zeros(masks.shape[1:], dtype=bool)
    for mask in masks:
        if (covered & mask).any():
            return True
        covered |= mask
    return False


def _display_color(spec: SegmentSpec) -> hd.color.CIELabColor | None:
    # RecommendedDisplayCIELabValue (PS3.3 C.8.20.2): how viewers colour the segment.
    lab = spec.color_lab
    return None if lab is None else hd.color.CIELabColor.from_dicom_value(lab)


def _image_laterality(source: Dataset) -> str:
    """The source's Image, Frame (shared) or series Laterality, or "" if it states none."""
    shared = source.get("SharedFunctionalGroupsSequence") or [Dataset()]
    anatomy = shared[0].get("FrameAnatomySequence") or [Dataset()]
    for value in (
        source.get("ImageLaterality"),
        anatomy[0].get("FrameLaterality"),
        source.get("Laterality"),
    ):
        if str(value or "") in _IMAGE_LATERALITIES:
            return str(value)
    return ""


def tracking_uid(uids: OutputUids, segment_number: int) -> str:
    """The Tracking UID of one segment; the SEG and the SR must carry the same value."""
    return derive_uid(uids.seg_instance, "tracking", str(segment_number))


def _check_inputs(masks: np.ndarray, segments: Sequence[SegmentSpec]) -> None:
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


def _check_pixel_shape(source: Sequence[Dataset], masks: np.ndarray) -> None:
    rows, columns = int(source[0].Rows), int(source[0].Columns)
    if masks.shape[2:] != (rows, columns):
        raise PermanentError(
            f"masks slices are {masks.shape[2:]}, the source images ({rows}, {columns})"
        )


def _highdicom_planes(
    source: Sequence[Dataset], mapping: Sequence[tuple[int, int]], masks: np.ndarray
) -> tuple[list[Dataset], np.ndarray, list[hd.PlanePositionSequence] | None]:
    """Source images, pixel array (frames, rows, columns, segments) and plane positions.

    For single-frame sources, the images in slice order and the masks as they are. For one
    multi-frame source, one plane per source frame in stored order (highdicom pairs plane j
    with frame j + 1), empty where the frame is no slice of the masks; empty frames are
    omitted. If every mask is empty: one plane at the first slice, placed by its position.
    """
    # highdicom wants segments stacked on the last axis.
    stacked = np.moveaxis(masks, 0, -1)
    multiframe = is_multiframe(source[0])
    headers = list(source) if multiframe else [source[i] for i, _ in mapping]
    if not masks.any():
        position, _ = frame_plane(source, *mapping[0])
        plane = hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position.tolist())
        return headers, stacked[:1], [plane]
    if not multiframe:
        return headers, stacked, None
    pixels = np.zeros((number_of_frames(source[0]), *stacked.shape[1:]), dtype=bool)
    pixels[[k for _, k in mapping]] = stacked
    return headers, pixels, None


def _replace_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = uid
