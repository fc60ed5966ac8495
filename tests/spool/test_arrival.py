"""Admitting an instance: one SOP Instance UID in one series of its study, with its digest."""

from __future__ import annotations

import io
import logging
from functools import partial
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from agent.db.values import ArrivedInstance
from agent.receive.identify import Identifiers
from agent.spool.arrival import IN_ANOTHER_SERIES, NotAdmitted, Refusal, admit
from agent.spool.digest import bytes_digest, dataset_digest
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic
from tests.support.receiver import minimal_ct


def _ids(ds: Dataset) -> Identifiers:
    return Identifiers(
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
    )


def _file(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _place(data: bytes, layout: SpoolLayout, path: Path) -> None:
    write_atomic(path, [data], layout.tmp)


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    return layout


def test_the_same_uid_in_another_series_is_refused_and_nothing_is_placed(
    layout: SpoolLayout, caplog: pytest.LogCaptureFixture
) -> None:
    first = minimal_ct()
    moved = minimal_ct()
    moved.StudyInstanceUID, moved.SOPInstanceUID = first.StudyInstanceUID, first.SOPInstanceUID
    arrivals: list[ArrivedInstance] = []
    assert (
        admit(layout, _ids(first), partial(_place, _file(first), layout), arrivals.append) is None
    )
    with caplog.at_level(logging.WARNING):
        refused = admit(layout, _ids(moved), partial(_place, _file(moved), layout), arrivals.append)
    assert refused == NotAdmitted(Refusal.DUPLICATE, IN_ANOTHER_SERIES)
    assert len(arrivals) == 1
    assert not layout.instance_path(*_path_ids(moved)).exists()
    assert str(first.SOPInstanceUID) not in caplog.text


def _path_ids(ds: Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_a_re_send_in_the_same_series_is_admitted_with_the_digest_of_its_content(
    layout: SpoolLayout,
) -> None:
    ds = minimal_ct()
    arrivals: list[ArrivedInstance] = []
    for comment in ("one", "one", "two"):
        ds.ImageComments = comment
        data = _file(ds)
        assert admit(layout, _ids(ds), partial(_place, data, layout), arrivals.append) is None
    same, again, other = (a.digest for a in arrivals)
    assert same == again != other
    # The digest read back from the file is the one of the dataset as a C-STORE carries it
    # (after the meta group), which the C-STORE stream and a pull compute from their bytes.
    encoded = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert encoded is not None
    assert other == dataset_digest(arrivals[-1].path) == bytes_digest(encoded)
