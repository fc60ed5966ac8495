"""Fixtures of the export tests: delivery records in a real database, a job's outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from agent.db.database import Database
from agent.db.deliveries import Deliveries
from tests.export.test_outbox import _object


@pytest.fixture
def deliveries(database_url: str) -> Iterator[Deliveries]:
    db = Database(database_url)
    db.create_schema()
    yield Deliveries(db)
    db.dispose()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """A SEG and an SR in the job's outbox, named by SOP Instance UID."""
    return [
        _object(tmp_path / "outbox", SegmentationStorage),
        _object(tmp_path / "outbox", Comprehensive3DSRStorage),
    ]
