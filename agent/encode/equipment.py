"""Header values SEG and SR share: IHE AIR provenance, equipment, times and descriptions."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from agent import __version__
from agent.dicom.codes import IHE_CODING_SCHEME, PROCESSING_ALGORITHM
from agent.dicom.uids import derive_uid
from agent.domain import ModelIdentity
from agent.encode.charset import output_character_set
from agent.errors import PermanentError

# General Equipment (PS3.3 C.7.5.1) and Enhanced General Equipment (C.7.5.2) describe the
# application that created the instance: this service. The model itself is described in the
# Contributing Equipment item and the algorithm identification.
MANUFACTURER = "pacs-agent"
MODEL_NAME = "pacs-agent"
SOFTWARE_VERSION = __version__
# Enhanced General Equipment makes Device Serial Number type 1; software has no serial, and a
# per-host value would make a repeat on another worker differ, so it is a constant.
DEVICE_SERIAL_NUMBER = "pacs-agent"

# PS3.10 7.1 File Meta Information: Implementation Class UID and Version Name identify the
# application that wrote the file. highdicom names itself there; the files are ours. The UID is
# fixed for the application (derived once, under 2.25); the version name (SH, at most 16
# characters) tells its releases apart.
IMPLEMENTATION_CLASS_UID = UID(derive_uid("pacs-agent", "implementation-class"))
IMPLEMENTATION_VERSION_NAME = f"pacs-agent{__version__}"

# Used when no source instance carries a parsable date: a fixed value keeps repeats identical.
_FALLBACK_TIMESTAMP = datetime.datetime(1970, 1, 1)

_LO_MAX = 64  # PS3.5 6.2: LO is at most 64 characters.

# highdicom checks these source values, quoting them in warnings and errors (logs): it gets
# them empty, and `stamp_instance` restores the source's elements unchanged.
_RESTORED = ("PatientName", "PatientBirthDate")
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
# highdicom reads from the first source without a default.
_TYPE_2_HIGHDICOM_READS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_NOT_FOR_DIAGNOSIS = " - research use, not for diagnosis"
_SHORT_NOT_FOR_DIAGNOSIS = " - not for diagnosis"


def contributing_equipment(
    model: ModelIdentity, *, contributed: datetime.datetime | None = None
) -> Dataset:
    """The Contributing Equipment Sequence item that describes the AI model (IHE AIR 6.5.3.1).

    AIR asks for Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"), Manufacturer,
    Manufacturer's Model Name, Software Versions and Device UID; Contribution DateTime
    (PS3.3 C.12.1.1.5, type 3) is added when `contributed` is given.
    """
    item = Dataset()
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = _lo(model.manufacturer, "model manufacturer")
    item.ManufacturerModelName = _lo(model.name, "model name")
    item.SoftwareVersions = _lo(model.version, "model version")
    item.DeviceUID = model.device_uid
    if contributed is not None:
        item.ContributionDateTime = _dt(contributed)
    item.ContributionDescription = "AI model that produced this result"
    return item


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification Sequence items for the private schemes we use.

    The SOP Common Module (PS3.3 C.12.1) lets an instance identify the coding schemes it uses
    that PS3.16 does not list; 99IHE is the IHE placeholder scheme of the AIR purpose code.
    """
    return [
        CodingSchemeIdentificationItem(
            designator=IHE_CODING_SCHEME,
            name="IHE provisional codes",
            responsible_organization="IHE International",
        )
    ]


def creation_time(
    created: datetime.datetime | None, source: Sequence[Dataset]
) -> datetime.datetime:
    """The Content and Instance Creation Date/Time of an object made from `source`, naive.

    `created` is when the result was made (IHE AIR, PS3.3 C.7.6.1, C.12.1): the pipeline
    records the time of its first encoding and passes it on every later one, so a repeat is
    byte-identical. An aware `created` is written in the source's time zone: the offset of
    its Timezone Offset From UTC, which our object carries too (PS3.3 C.12.1.1.8: it applies
    to every date and time of the instance, the study's copied from the source included),
    else this host's local time, as DICOM dates without an offset are. A naive `created` is
    taken as it is. None: `creation_timestamp(source)`, for callers with no record.
    """
    if created is None:
        return creation_timestamp(source)
    if created.tzinfo is None:
        return created
    zone = _utc_offset(source[0].get("TimezoneOffsetFromUTC"))
    local = created.astimezone(zone) if zone is not None else created.astimezone()
    return local.replace(tzinfo=None)


def creation_timestamp(source: Sequence[Dataset]) -> datetime.datetime:
    """A date/time for objects derived from `source` without a recorded creation time.

    Deterministic: the latest acquisition-side time stamp of the source instances, the
    earliest moment the result can have been made: per instance, Content Date/Time, else
    Acquisition, Series, then Study Date/Time. If none parses, a fixed date is used.
    """
    candidates: list[datetime.datetime] = []
    for ds in source:
        stamp = _instance_timestamp(ds)
        if stamp is not None:
            candidates.append(stamp)
    return max(candidates) if candidates else _FALLBACK_TIMESTAMP


def stamp_instance(
    instance: Dataset, source: Sequence[Dataset], model: ModelIdentity, when: datetime.datetime
) -> None:
    """Finish a built SEG or SR: fix what highdicom derives, add the AIR item, set the charset.

    Call it last, once every value of `instance` is set. The file meta names this application
    as the implementation that wrote the file, where highdicom names itself. highdicom sets
    Instance Creation Date/Time and its own Contributing Equipment item's Contribution DateTime from
    `datetime.now()`; both are replaced by `when` so repeats are byte-identical. Patient's
    Name and Birth Date are restored from the source as received (see `highdicom_source`). The
    Contributing Equipment item for the model is appended because highdicom only accepts
    purposes from CID 7005, and AIR's purpose is not among them. Specific Character Set is
    set as `charset.output_character_set` decides.
    """
    instance.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    instance.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    instance.InstanceCreationDate = _da(when)
    instance.InstanceCreationTime = _tm(when)
    offset = source[0].get("TimezoneOffsetFromUTC")
    if offset:
        # PS3.3 C.12.1: the study's dates are the source's local ones, and `creation_time`
        # writes ours in the same zone, so the instance shares the source's offset.
        instance.TimezoneOffsetFromUTC = offset
    for keyword in _RESTORED:
        if keyword in source[0]:
            # The element itself, not its value: no re-validation (that would quote it).
            instance.add(copy.deepcopy(source[0][keyword]))
    for item in instance.get("ContributingEquipmentSequence", []):
        # Only highdicom's own item: the acquisition item's time (if any) is the source's.
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = _dt(when)
    items = list(instance.get("ContributingEquipmentSequence", []))
    items.append(contributing_equipment(model, contributed=when))
    instance.ContributingEquipmentSequence = items
    terms = output_character_set(instance, source[0])
    if not terms:
        instance.pop("SpecificCharacterSet", None)
    else:
        instance.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms


def highdicom_source(first: Dataset) -> Dataset:
    """A copy of the first source header that highdicom can copy patient and study data from.

    highdicom checks Patient's Name and Birth Date and quotes them when it objects (a
    legal single-component name such as "DOE", PS3.5 6.2.1.2, draws a warning): the copy
    has them empty, and `stamp_instance` restores the source's values. highdicom also reads
    the Type 2 Patient and Study attributes without a default: absent ones are added empty,
    as the SEG and SR must carry them anyway (PS3.3 C.7.1.1, C.7.2.1). Private elements are
    removed, nested ones included.
    """
    # A deep copy: pydicom copies share data elements, and the caller's header must not change.
    clone = copy.deepcopy(first)
    # highdicom copies whole sequences of the Patient and Study modules. Private elements
    # inside them (PS3.5 7.8) are another application's, with meanings (and possibly
    # identity) that our objects cannot vouch for: they are not repeated.
    clone.remove_private_tags()
    for keyword in _TYPE_2_HIGHDICOM_READS:
        if keyword in _RESTORED or keyword not in clone:
            setattr(clone, keyword, None)
    return clone


def check_instance_number(value: int) -> None:
    """PermanentError unless `value` can be an Instance Number: 1 to 2**31 - 1 (IS, PS3.5 6.2)."""
    if not 1 <= value < 2**31:
        raise PermanentError(f"instance number (revision) must be 1 to 2**31 - 1, got {value}")


def series_description(model: ModelIdentity, kind: str) -> str:
    """Series Description that says the series is AI-generated and not for diagnosis (≤ 64).

    It names the model but not its version: the result series holds every revision of the
    model's results for the study, versions included (see `output_uids`), and a series-level
    attribute must be the same in all of them. The version is in each instance's Contributing
    Equipment and algorithm identification.
    """
    head = f"AI {model.name} {kind}"
    for tail in (_NOT_FOR_DIAGNOSIS, _SHORT_NOT_FOR_DIAGNOSIS):
        if len(head) + len(tail) <= _LO_MAX:
            return head + tail
    # Long model names: keep the warning whole and shorten the name instead.
    room = _LO_MAX - len(_SHORT_NOT_FOR_DIAGNOSIS)
    return head[:room].rstrip() + _SHORT_NOT_FOR_DIAGNOSIS


def _lo(value: str, what: str) -> str:
    if not value or len(value) > _LO_MAX or "\\" in value:
        raise ValueError(f"{what} must be 1 to {_LO_MAX} characters without a backslash")
    return value


def _instance_timestamp(ds: Dataset) -> datetime.datetime | None:
    for date_kw, time_kw in (
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date = _parse_date(ds.get(date_kw))
        if date is None:
            continue
        time = _parse_time(ds.get(time_kw)) or datetime.time()
        return datetime.datetime.combine(date, time)
    return None


def _utc_offset(value: object) -> datetime.timezone | None:
    """A Timezone Offset From UTC value ("+HHMM" or "-HHMM", PS3.3 C.12.1.1.8), or None."""
    text = str(value or "").strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    hours, minutes = int(text[1:3]), int(text[3:])
    if hours > 14 or minutes > 59:
        return None
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    return datetime.timezone(-delta if text[0] == "-" else delta)


def _parse_date(value: object) -> datetime.date | None:
    if value is None or value == "":
        return None
    try:
        parsed = DA(str(value))
    except ValueError:
        return None  # a malformed header date is skipped, not quoted in an error
    return datetime.date(parsed.year, parsed.month, parsed.day) if parsed is not None else None


def _parse_time(value: object) -> datetime.time | None:
    if value is None or value == "":
        return None
    try:
        parsed = TM(str(value))
    except ValueError:
        return None
    if parsed is None:
        return None
    return datetime.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)


def _da(when: datetime.datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime.datetime) -> str:
    return when.strftime("%H%M%S.%f") if when.microsecond else when.strftime("%H%M%S")


def _dt(when: datetime.datetime) -> str:
    return _da(when) + _tm(when)


def content_date(when: datetime.datetime) -> str:
    """`when` as a DA value."""
    return _da(when)


def content_time(when: datetime.datetime) -> str:
    """`when` as a TM value."""
    return _tm(when)


__all__ = [
    "DEVICE_SERIAL_NUMBER",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "check_instance_number",
    "coding_schemes",
    "content_date",
    "content_time",
    "contributing_equipment",
    "creation_time",
    "creation_timestamp",
    "highdicom_source",
    "series_description",
    "stamp_instance",
]
