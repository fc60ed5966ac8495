"""The start-up spool scan, and `serve` starting with a deflate bomb in its spool."""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.assembly.assembler import Assembler
from agent.db.database import Database
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.logs import instance_key
from agent.settings import ModelSettings
from agent.spool.digest import dataset_digest
from agent.spool.layout import SpoolLayout
from agent.spool.scanner import unknown_instances
from tests.assembly.test_assembler import T0, FakeClock, Recorder
from tests.support.agent import serving_agent, wait_for_study
from tests.support.bombs import GIB, bomb_file, deflated_file
from tests.support.process import peak_rss_bytes
from tests.support.receiver import minimal_ct

LIMIT = 64 * 1024 * 1024


def _spooled(layout: SpoolLayout, ds: Dataset, pixel_bytes: int) -> Path:
    path = layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return bomb_file(path, ds, pixel_bytes)


def _record(db: Database, ds: Dataset, path: Path, at: datetime) -> None:
    """Record `ds`, spooled at `path`, as the receiver would have."""
    study, series, sop, sop_class = (
        str(ds[k].value)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    )
    db.record_arrivals([ArrivedInstance(study, series, sop, sop_class, path, at)])


def test_the_scan_reports_a_bomb_and_leaves_it_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = SpoolLayout(tmp_path / "spool")
    bomb, good = minimal_ct(), minimal_ct()
    bomb_path = _spooled(layout, bomb, 2 * GIB)
    good_path = layout.instance_path(
        good.StudyInstanceUID, good.SeriesInstanceUID, good.SOPInstanceUID
    )
    deflated_file(good_path, good, 1024)
    with caplog.at_level(logging.WARNING):
        found = list(unknown_instances(layout, set(), max_bytes=LIMIT))
    assert [a.sop_uid for a in found] == [good.SOPInstanceUID]
    assert bomb_path.exists()
    # The file is named by its key, never by its SOP Instance UID (no identifiers in logs).
    assert f"not processed: cannot read {instance_key(bomb_path)}: inflated dataset over the" in (
        caplog.text
    )
    assert bomb.SOPInstanceUID not in caplog.text


def test_serve_starts_with_bombs_in_its_spool_without_inflating_them(tmp_path: Path) -> None:
    """One bomb the database never heard of (the scan), one an older version recorded (sealing).

    Before, each was inflated whole in memory: gigabytes for a 2 MB file, and a start that
    failed under a memory limit until someone deleted it.
    """
    folder = tmp_path / "agent"
    layout = SpoolLayout(folder / "spool")
    unknown, recorded = minimal_ct(), minimal_ct()
    pixels = 2 * GIB + 1024 * 1024  # past the default limit of [receiver] max_instance_bytes
    _spooled(layout, unknown, pixels)
    path = _spooled(layout, recorded, pixels)
    db = Database(f"sqlite:///{folder / 'pacs-agent.db'}")
    db.create_schema()
    _record(db, recorded, path, datetime.now(UTC))
    db.dispose()
    with serving_agent(folder, quiet_seconds=0.5) as (agent, db, _port):
        agent.wait_log("spool file left in place, not processed", timeout=120)
        study = wait_for_study(
            db, str(recorded.StudyInstanceUID), {State.SKIPPED}, 120, agent.log_tail
        )
        assert agent.process is not None
        peak = peak_rss_bytes(agent.process.pid)
        log = agent.log_path.read_text()
    assert "instance not usable" in log and "inflated dataset over the" in log
    assert study.instance_count == 1
    assert db.get(str(unknown.StudyInstanceUID)) is None
    # A bound on memory, not a time: the process holds a few chunks of each bomb, not 2 GiB.
    assert peak < 1 * GIB, f"peak RSS {peak >> 20} MiB"


def test_the_assembler_reads_the_spool_within_the_receivers_limit(tmp_path: Path) -> None:
    """`[receiver] max_instance_bytes` bounds the start-up scan and sealing too, not only the
    receiver: before, both read with the 2 GiB default whatever the limit was, so a file of
    100 MB inflated (an older version's, or one stored under a larger limit) was read whole."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    unknown, recorded = minimal_ct(), minimal_ct()
    pixels = LIMIT + 1024 * 1024  # over this agent's limit, well within the default
    _spooled(layout, unknown, pixels)
    path = _spooled(layout, recorded, pixels)
    _record(db, recorded, path, T0)
    clock = FakeClock()
    assembler = Assembler(
        db,
        layout,
        quiet_seconds=1.0,
        models=(ModelSettings(),),
        enqueue=Recorder(),
        clock=clock,
        max_instance_bytes=LIMIT,
    )
    assembler.resume(requeue_in_flight=True)
    assert db.get(str(unknown.StudyInstanceUID)) is None  # left in place, not recorded
    clock.at += timedelta(seconds=5)
    assembler.seal_quiet_studies()
    study = db.get(str(recorded.StudyInstanceUID))
    assert study is not None and study.state == State.SKIPPED, study and study.reason


def _copy_in_series(layout: SpoolLayout, ds: Dataset, series_uid: str) -> Path:
    """A copy of `ds` stored under another series, as an older version stored it."""
    copy = deepcopy(ds)
    copy.SeriesInstanceUID = series_uid
    path = layout.instance_path(ds.StudyInstanceUID, series_uid, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy.save_as(path, enforce_file_format=True)
    return path


def _start(layout: SpoolLayout, db: Database) -> list[str]:
    """What a start of `serve` does with the spool: record what the database does not know."""
    return db.record_arrivals(list(unknown_instances(layout, db.known_paths())))


def test_restarts_keep_the_recorded_copy_of_an_instance_stored_in_two_series(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, each start took the copy the database did not know, switching the study's
    input between the two series and reopening it, so each restart exported a new revision."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    ds = minimal_ct()
    first = _copy_in_series(layout, ds, str(ds.SeriesInstanceUID))
    second = _copy_in_series(layout, ds, generate_uid())
    os.utime(second, (first.stat().st_mtime + 10, first.stat().st_mtime + 10))
    db = Database(database_url)
    db.create_schema()
    try:
        with caplog.at_level(logging.WARNING):
            assert len(_start(layout, db)) == 1
        study_uid = str(ds.StudyInstanceUID)
        db.transition(study_uid, State.COMPLETE)
        db.transition(study_uid, State.SKIPPED, "no model")
        for _restart in range(2):
            assert _start(layout, db) == []
        study = db.get(study_uid)
        assert study is not None and study.state == State.SKIPPED
        assert db.instance_paths(study.id) == [first]
        assert db.instance_digests(study.id)[first] == dataset_digest(first)
        assert second.exists()  # left in place, reported
        assert "SOP Instance already stored in another series of this study" in caplog.text
        assert str(ds.SOPInstanceUID) not in caplog.text
    finally:
        db.dispose()


def test_the_scan_keeps_a_copy_recorded_before_even_when_it_is_the_newer(
    tmp_path: Path,
) -> None:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    ds = minimal_ct()
    older = _copy_in_series(layout, ds, generate_uid())
    recorded = _copy_in_series(layout, ds, str(ds.SeriesInstanceUID))
    os.utime(older, (recorded.stat().st_mtime - 10, recorded.stat().st_mtime - 10))
    assert older.parent != recorded.parent
    assert list(unknown_instances(layout, {str(recorded)})) == []


def test_the_scan_reads_the_accession_number_into_its_digest(tmp_path: Path) -> None:
    from agent.logs import accession_digest

    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    ds = minimal_ct()
    ds.AccessionNumber = "RAD-9"
    path = layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    [found] = unknown_instances(layout, set())
    assert found.accession_hash == accession_digest("RAD-9")
