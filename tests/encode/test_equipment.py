"""Provenance helpers: the AIR Contributing Equipment item, timestamps, descriptions."""

from __future__ import annotations

import datetime

import pytest
from pydicom import Dataset, config

from agent.domain import ModelIdentity
from agent.encode.equipment import (
    contributing_equipment,
    creation_timestamp,
    highdicom_source,
    series_description,
)
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
        series_description(model(), "SEG")
        == "AI ct-tissue 1.0.0 SEG - research use, not for diagnosis"
    )


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
    original = _header(PatientName="SINGLE", SpecificCharacterSet="", PatientID="P1")
    copy = highdicom_source(original)
    assert copy.PatientName == "SINGLE^"
    assert "SpecificCharacterSet" not in copy
    assert original.PatientName == "SINGLE"
    assert original.SpecificCharacterSet == ""
    assert highdicom_source(_header(PatientName="DOE^JOHN")).PatientName == "DOE^JOHN"
