"""Provenance helpers: the AIR Contributing Equipment item, timestamps, descriptions."""

from __future__ import annotations

import datetime

import pytest
from pydicom import Dataset, config

from agent.domain import ModelIdentity
from agent.encode.charset import output_character_set
from agent.encode.equipment import (
    check_instance_number,
    contributing_equipment,
    creation_timestamp,
    highdicom_source,
    series_description,
)
from agent.errors import PermanentError
from tests.encode import model


def test_contributing_equipment_item_per_ihe_air() -> None:
    identity = model()
    item = contributing_equipment(identity, contributed=datetime.datetime(2024, 1, 2, 3, 4, 5))
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert item.Manufacturer == identity.manufacturer
    assert item.ManufacturerModelName == identity.name
    assert item.SoftwareVersions == identity.version
    assert item.DeviceUID == identity.device_uid
    assert item.ContributionDateTime == "20240102030405"
    assert "ContributionDateTime" not in contributing_equipment(identity)


def test_contributing_equipment_rejects_values_too_long_for_lo() -> None:
    identity = model()
    long_name = ModelIdentity(
        "x" * 65, identity.version, identity.manufacturer, identity.device_uid
    )
    with pytest.raises(ValueError, match="model name"):
        contributing_equipment(long_name)


@pytest.mark.parametrize("name", ["ct-tissue", "a" * 20, "b" * 40, "c" * 64])
@pytest.mark.parametrize("kind", ["SEG", "SR"])
def test_series_description_fits_lo_and_keeps_the_warning(name: str, kind: str) -> None:
    identity = ModelIdentity(name, "10.20.30", "m", "1.2.3")
    text = series_description(identity, kind)
    assert len(text) <= 64
    assert text.startswith("AI ")
    assert text.endswith("not for diagnosis")


def test_series_description_for_a_short_name() -> None:
    assert (
        series_description(model(), "SEG") == "AI ct-tissue SEG - research use, not for diagnosis"
    )
    # One series holds every version's results, so the version is not in its description.
    assert series_description(model("2.0.0"), "SEG") == series_description(model(), "SEG")


def _header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_creation_timestamp_takes_the_latest_source_time() -> None:
    source = [
        _header(ContentDate="20240102", ContentTime="101500"),
        _header(ContentDate="20240102", ContentTime="101659.25"),
        _header(ContentDate="20240101", ContentTime="235959"),
    ]
    assert creation_timestamp(source) == datetime.datetime(2024, 1, 2, 10, 16, 59, 250000)


def test_creation_timestamp_falls_back_through_acquisition_series_and_study() -> None:
    assert creation_timestamp([_header(AcquisitionDate="20240103", AcquisitionTime="1200")]) == (
        datetime.datetime(2024, 1, 3, 12, 0)
    )
    assert creation_timestamp([_header(StudyDate="20240104", StudyTime="")]) == (
        datetime.datetime(2024, 1, 4)
    )
    assert creation_timestamp([_header(ContentDate="", SeriesDate="20240105")]) == (
        datetime.datetime(2024, 1, 5)
    )
    # Unparsable or absent everywhere: a fixed date, never the clock. (pydicom's own validation
    # is off here; it is not what is under test.)
    with config.disable_value_validation():
        assert creation_timestamp([_header(StudyDate="garbage")]) == datetime.datetime(1970, 1, 1)
    assert creation_timestamp([Dataset()]) == datetime.datetime(1970, 1, 1)


def test_highdicom_source_copies_and_does_not_touch_the_original() -> None:
    original = _header(PatientName="SINGLE", PatientBirthDate="19700101", PatientID="P1")
    copy = highdicom_source(original)
    # highdicom checks these and quotes them when it objects; stamp_instance restores them.
    assert not copy.PatientName
    assert not copy.PatientBirthDate
    assert copy.PatientID == "P1"
    # Type 2 attributes highdicom reads are added, empty, where the source lacks them.
    for keyword in ("PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        assert keyword in copy and not copy[keyword].value
    assert "ReferringPhysicianName" in copy
    assert original.PatientName == "SINGLE"
    assert original.PatientBirthDate == "19700101"
    assert "AccessionNumber" not in original


def _instance(*texts: str) -> Dataset:
    """A dataset holding `texts` as LO values, the last one inside a sequence item."""
    ds = Dataset()
    ds.StudyDescription = texts[0]
    item = Dataset()
    item.CodeMeaning = texts[-1]
    ds.ConceptNameCodeSequence = [item]
    return ds


@pytest.mark.parametrize(
    ("declared", "texts", "expected"),
    [
        (None, ("plain ASCII",), []),
        ("", ("plain ASCII",), []),
        # Undeclared non-ASCII (pydicom reads it as Latin-1): the default repertoire is ASCII.
        (None, ("Jérôme",), ["ISO_IR 192"]),
        ("ISO_IR 100", ("Jérôme", "Müller"), ["ISO_IR 100"]),
        ("ISO_IR 100", ("Jérôme", "Иван"), ["ISO_IR 192"]),
        ("ISO_IR 144", ("Иван", "ASCII"), ["ISO_IR 144"]),
        ("ISO_IR 192", ("山田", "Jérôme"), ["ISO_IR 192"]),
        (["", "ISO 2022 IR 87"], ("山田^太郎", "やまだ"), ["", "ISO 2022 IR 87"]),
        (["", "ISO 2022 IR 149"], ("홍^길동", "洪"), ["", "ISO 2022 IR 149"]),
        # Half-width katakana are in JIS X 0201 (IR 13), not JIS X 0208 (IR 87), and the
        # reverse for kanji.
        (["", "ISO 2022 IR 87"], ("ｱｲｳ",), ["ISO_IR 192"]),
        ("ISO_IR 13", ("ｱｲｳ",), ["ISO_IR 13"]),
        ("ISO_IR 13", ("山田",), ["ISO_IR 192"]),
        # Not valid values (PS3.3 C.12.1.1.2): an unknown term, a multi-byte set alone or
        # first, a stand-alone set among code extensions.
        ("ISO_IR 999", ("ASCII",), ["ISO_IR 192"]),
        ("ISO 2022 IR 87", ("山田",), ["ISO_IR 192"]),
        (["ISO 2022 IR 87", "ISO 2022 IR 100"], ("ASCII",), ["ISO_IR 192"]),
        (["ISO_IR 100", "ISO 2022 IR 87"], ("ASCII",), ["ISO_IR 192"]),
    ],
)
def test_output_character_set_keeps_the_source_value_when_it_can(
    declared: str | list[str] | None, texts: tuple[str, ...], expected: list[str]
) -> None:
    source = Dataset()
    if declared is not None:
        source.SpecificCharacterSet = declared
    assert output_character_set(_instance(*texts), source) == expected


@pytest.mark.parametrize("value", [0, -1, 2**31])
def test_check_instance_number_rejects_values_outside_is(value: int) -> None:
    with pytest.raises(PermanentError, match="instance number"):
        check_instance_number(value)
    check_instance_number(1)
    check_instance_number(2**31 - 1)
