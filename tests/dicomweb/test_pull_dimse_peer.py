"""The DIMSE source against a scripted pynetdicom archive: the cases Orthanc does not produce."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from pynetdicom.transport import ThreadedAssociationServer

from agent.db.database import Database
from agent.pull.dimse import DimseSource
from agent.pull.puller import Puller
from agent.pull.source import SourceRefused
from agent.settings import SourceSettings
from agent.spool.layout import SpoolLayout
from tests.support.phantom import write_phantom_series
from tests.support.ports import free_port


class Archive:
    """Answers study-level C-FIND with one study, and C-GET with the given datasets."""

    def __init__(self, datasets: list[Dataset], **ae_options: Any) -> None:
        self.datasets = datasets
        self.study_uid = str(datasets[0].StudyInstanceUID)
        self.port = free_port()
        ae = AE(ae_title="ARCHIVE")
        for key, value in ae_options.items():
            setattr(ae, key, value)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, scu_role=True, scp_role=True)
        self._ae = ae
        self.server: ThreadedAssociationServer | None = None

    def _find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = self.study_uid
        ds.NumberOfStudyRelatedInstances = len(self.datasets)
        yield 0xFF00, ds

    def _get(self, event: Event) -> Iterator[int | tuple[int, Dataset | None]]:
        yield len(self.datasets)
        for ds in self.datasets:
            yield 0xFF00, ds

    def __enter__(self) -> Archive:
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)]
        self.server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def source(self) -> DimseSource:
        settings = SourceSettings(
            name="archive",
            kind="dimse",
            ae_title="ARCHIVE",
            host="127.0.0.1",
            port=self.port,
            timeout_seconds=10,
        )
        return DimseSource(settings, "PACS_AGENT")


@pytest.fixture
def puller(tmp_path: Path) -> Iterator[Puller]:
    """A puller into a fresh spool and database, with the receiver's limit of 512 KiB."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    yield Puller(db, layout, max_instance_bytes=512 * 1024)
    db.dispose()


@pytest.fixture
def datasets(tmp_path: Path) -> list[Dataset]:
    truth = write_phantom_series(tmp_path / "phantom", slices=4, rows=16, cols=16)
    return [pydicom.dcmread(path) for path in truth.files]


def test_a_bad_instance_is_refused_in_the_c_store_and_the_rest_is_pulled(
    puller: Puller, datasets: list[Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    del datasets[1].SeriesInstanceUID  # the receiver's 0xC001 case
    with Archive(datasets) as archive, caplog.at_level(logging.WARNING):
        result = puller.pull(archive.source(), archive.study_uid)
    assert (result.stored, result.expected) == (3, 4)
    assert "missing or invalid SeriesInstanceUID" in caplog.text
    assert "C-GET from archive: 1 instances not retrieved (3 sent)" in caplog.text


def test_an_archive_that_does_not_know_us_is_refused_not_retried(
    datasets: list[Dataset],
) -> None:
    with (
        Archive(datasets, require_calling_aet=["SOMEONE"]) as archive,
        pytest.raises(
            SourceRefused,
            match=r"association rejected by \w+: calling AE title PACS_AGENT not recognized "
            r"\(permanent\)",
        ),
    ):
        archive.source().instance_count(archive.study_uid)


def test_a_retrieved_instance_over_the_size_limit_is_refused_without_being_held(
    puller: Puller, datasets: list[Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    datasets[2].add_new(0x00091010, "OB", bytes(2 * 1024 * 1024))  # bulk in a private element
    with Archive(datasets) as archive, caplog.at_level(logging.WARNING):
        settings = archive.source().settings
        source = DimseSource(settings, "PACS_AGENT", max_instance_bytes=512 * 1024)
        result = puller.pull(source, archive.study_uid)
    assert (result.stored, result.expected) == (3, 4)
    assert "refused a retrieved instance of " in caplog.text
    assert "the limit is 524288 bytes" in caplog.text
