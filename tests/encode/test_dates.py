"""SEG and SR dates say when the result was made, not when the source was acquired."""

from __future__ import annotations

import datetime

import pytest
from pydicom import Dataset

from agent.encode.equipment import creation_time, creation_timestamp
from tests.encode import encode, read_headers, synthetic_masks
from tests.support.data import dicom_files, shared_data

MADE = datetime.datetime(2026, 3, 5, 22, 30, 15, tzinfo=datetime.UTC)


def _header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("offset", "local"),
    [
        ("+0200", datetime.datetime(2026, 3, 6, 0, 30, 15)),
        ("-0530", datetime.datetime(2026, 3, 5, 17, 0, 15)),
        ("+0000", datetime.datetime(2026, 3, 5, 22, 30, 15)),
    ],
)
def test_creation_time_is_in_the_zone_of_the_source_offset(
    offset: str, local: datetime.datetime
) -> None:
    source = [_header(TimezoneOffsetFromUTC=offset, ContentDate="20030417")]
    assert creation_time(MADE, source) == local


def test_creation_time_without_an_offset_is_this_hosts_local_time() -> None:
    source = [_header(ContentDate="20030417", ContentTime="101500")]
    assert creation_time(MADE, source) == MADE.astimezone().replace(tzinfo=None)
    # A malformed offset says nothing about the zone either.
    assert creation_time(MADE, [_header(TimezoneOffsetFromUTC="2 h")]) == creation_time(
        MADE, source
    )


def test_creation_time_takes_a_naive_time_as_it_is_and_none_from_the_source() -> None:
    source = [_header(ContentDate="20030417", ContentTime="101500")]
    naive = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert creation_time(naive, source) == naive
    assert creation_time(None, source) == creation_timestamp(source)


def test_seg_and_sr_dates_are_when_the_result_was_made() -> None:
    """IHE AIR and PS3.3 C.7.6.1, C.12.1: Content, Instance Creation and Contribution
    Date/Time say when the result was made; the source was acquired in 2003."""
    headers = read_headers(dicom_files(shared_data("dcmqi", "ct-3slice")))
    assert {str(ds.get("AcquisitionDate", "")) for ds in headers} == {"20030417"}
    masks = synthetic_masks(len(headers), int(headers[0].Rows), int(headers[0].Columns))
    encoded = encode(headers, masks, 1.0, created=MADE)
    local = MADE.astimezone().replace(tzinfo=None)
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    for ds in (encoded.seg, encoded.sr):
        assert (str(ds.ContentDate), str(ds.ContentTime)) == (date, time)
        assert (str(ds.InstanceCreationDate), str(ds.InstanceCreationTime)) == (date, time)
        contributions = [
            str(item.ContributionDateTime)
            for item in ds.ContributingEquipmentSequence
            if "ContributionDateTime" in item
        ]
        # highdicom's item and the model's (IHE AIR) item.
        assert contributions and set(contributions) == {date + time}
    # The study's dates stay the source's.
    assert encoded.seg.StudyDate == headers[0].StudyDate
