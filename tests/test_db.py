"""The study state machine and status lines, on every database backend."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.db.database import Database
from agent.db.states import InvalidTransition, State, Superseded, allowed
from agent.db.values import ArrivedInstance
from agent.logs import study_key

STUDY = "1.2.826.0.1.3680043.8.498.1"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _arrival(sop: str, at: datetime = T0, study: str = STUDY) -> ArrivedInstance:
    return ArrivedInstance(
        study, study + ".1", sop, "1.2.840.10008.5.1.4.1.1.2", Path(f"/s/{sop}"), at
    )


def test_forward_path_and_terminal_states() -> None:
    path = [
        State.RECEIVING,
        State.COMPLETE,
        State.QUEUED,
        State.INFERRING,
        State.EXPORTING,
        State.DONE,
    ]
    for current, target in itertools.pairwise(path):
        assert allowed(current, target)
    assert not allowed(State.RECEIVING, State.QUEUED)
    assert allowed(State.COMPLETE, State.DONE)  # re-opened, but every input unchanged
    assert not allowed(State.RECEIVING, State.DONE)
    assert not allowed(State.DONE, State.FAILED)
    assert not allowed(State.SKIPPED, State.DONE)
    for state in State:
        assert allowed(state, State.RECEIVING)  # a late instance reopens any study
    assert allowed(State.INFERRING, State.FAILED)
    assert allowed(State.COMPLETE, State.SKIPPED)
    assert allowed(State.INFERRING, State.QUEUED)  # held: its model was paused meanwhile
    assert not allowed(State.EXPORTING, State.QUEUED)


def test_arrivals_group_by_study_and_count_once(db: Database) -> None:
    db.record_arrivals(
        [_arrival("1.1"), _arrival("1.2"), _arrival("1.1", T0 + timedelta(seconds=5))]
    )
    db.record_arrivals([_arrival("2.1", study="1.2.3")])
    study = db.get(STUDY)
    assert study is not None
    assert study.instance_count == 2
    assert study.state == State.RECEIVING
    assert study.last_arrival.astimezone(UTC) == T0 + timedelta(seconds=5)
    assert study.study_key == study_key(STUDY)
    assert len(db.in_states([State.RECEIVING])) == 2


def test_transitions_are_timestamped_and_shown_in_status(db: Database) -> None:
    db.record_arrivals([_arrival("1.1")])
    db.transition(STUDY, State.COMPLETE, "1 instances")
    db.transition(STUDY, State.QUEUED, job_id="job-1")
    db.transition(STUDY, State.INFERRING, expect_job="job-1")
    db.transition(STUDY, State.EXPORTING, expect_job="job-1")
    db.transition(STUDY, State.DONE, "2 objects sent", expect_job="job-1")
    (row,) = db.recent()
    assert row.state is State.DONE
    assert row.reason == "2 objects sent"
    assert row.instance_count == 1
    assert [s for s, _ in row.stages] == [
        State.RECEIVING,
        State.COMPLETE,
        State.QUEUED,
        State.INFERRING,
        State.EXPORTING,
        State.DONE,
    ]
    assert all(at.tzinfo is not None for _, at in row.stages)
    assert STUDY not in repr(row)  # status shows the key, never the UID


def test_invalid_transition_is_refused(db: Database) -> None:
    db.record_arrivals([_arrival("1.1")])
    with pytest.raises(InvalidTransition):
        db.transition(STUDY, State.DONE)
    db.transition(STUDY, State.SKIPPED, "no CT series")
    with pytest.raises(InvalidTransition):
        db.transition(STUDY, State.FAILED, "late")
    assert db.get(STUDY).reason == "no CT series"  # type: ignore[union-attr]


def test_late_instance_reopens_and_supersedes_the_job(db: Database) -> None:
    db.record_arrivals([_arrival("1.1")])
    db.transition(STUDY, State.COMPLETE)
    db.transition(STUDY, State.QUEUED, job_id="job-1")
    db.transition(STUDY, State.INFERRING, expect_job="job-1")
    db.record_arrivals([_arrival("1.2", T0 + timedelta(minutes=1))])
    study = db.get(STUDY)
    assert study is not None and study.state == State.RECEIVING and study.job_id is None
    assert study.reason.startswith("new instance after inferring")
    with pytest.raises(Superseded):
        db.transition(STUDY, State.EXPORTING, expect_job="job-1")


def test_expect_state_guards_duplicate_deliveries(db: Database) -> None:
    db.record_arrivals([_arrival("1.1")])
    db.transition(STUDY, State.COMPLETE)
    db.transition(STUDY, State.QUEUED, job_id="job-1")
    db.transition(STUDY, State.INFERRING, expect_job="job-1")
    db.transition(STUDY, State.EXPORTING, expect_job="job-1")
    with pytest.raises(InvalidTransition):
        db.transition(STUDY, State.INFERRING, expect_job="job-1", expect_state=[State.QUEUED])


def test_schema_creation_is_safe_when_processes_start_together(database_url: str) -> None:
    # serve and every worker create the schema at start; on a fresh database they race.
    from concurrent.futures import ThreadPoolExecutor

    databases = [Database(database_url) for _ in range(6)]
    try:
        with ThreadPoolExecutor(len(databases)) as pool:
            list(pool.map(lambda d: d.create_schema(), databases))
        databases[0].record_arrivals([_arrival("1.1")])
        assert databases[-1].get(STUDY) is not None
    finally:
        for d in databases:
            d.dispose()


def test_schema_of_an_older_version_gains_the_new_columns(database_url: str) -> None:
    """A database made before revisions existed is upgraded in place at start."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        for table in ("transition", "instance", "study"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(
            text(
                "CREATE TABLE study (id INTEGER PRIMARY KEY, study_uid VARCHAR(64) UNIQUE,"
                " study_key VARCHAR(16), state VARCHAR(16), reason TEXT, job_id VARCHAR(64),"
                " attempts INTEGER, instance_count INTEGER, first_arrival TIMESTAMP,"
                " last_arrival TIMESTAMP, updated_at TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO study VALUES (1, '1.2.3', 'abc', 'done', '', NULL, 0, 1,"
                " '2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    db = Database(database_url)
    try:
        db.create_schema()
        db.create_schema()  # a second start changes nothing
        columns = {c["name"] for c in inspect(db.engine).get_columns("study")}
        assert {"revision", "input_digest", "done_digest", "accession_hash"} <= columns
        # A new column's index comes with it: `status` looks studies up by accession.
        indexes = {ix["name"] for ix in inspect(db.engine).get_indexes("study")}
        assert "ix_study_accession_hash" in indexes
        study = db.get("1.2.3")
        assert study is not None
        assert (study.revision, study.input_digest, study.done_digest) == (0, "", "")
        assert study.accession_hash == ""
    finally:
        db.dispose()


def test_model_switch_overrides_replace_and_reset(db: Database) -> None:
    from sqlalchemy import insert

    from agent.db.schema import ModelSwitch
    from agent.db.switches import ModelSwitches
    from agent.settings import ModelSettings

    models = (ModelSettings(name="a"), ModelSettings(name="b", state="paused"))
    switches = ModelSwitches(db)
    assert switches.overrides() == {}
    assert switches.effective(models) == {"a": "on", "b": "paused"}
    switches.set("a", "paused")
    switches.set("a", "off")  # replaces, one row per model
    switches.set("b", "on")
    assert switches.overrides() == {"a": "off", "b": "on"}
    assert switches.effective(models) == {"a": "off", "b": "on"}
    assert switches.reset("b") and not switches.reset("b")
    assert switches.effective(models) == {"a": "off", "b": "paused"}
    with db.session() as s, s.begin():  # a state some later version wrote
        s.execute(insert(ModelSwitch).values(name="b", state="draining", changed_at=T0))
    assert switches.effective(models) == {"a": "off", "b": "paused"}


def test_an_instance_is_never_moved_to_another_series(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A second copy of an instance in another series (stored by an older version) must not
    switch the recorded one, which would switch the study's input on each start."""
    import logging
    from dataclasses import replace

    from agent.db.schema import Instance

    recorded = _arrival("1.1")
    db.record_arrivals([recorded])
    db.transition(STUDY, State.COMPLETE)
    db.transition(STUDY, State.SKIPPED, "no model")
    stray = replace(recorded, series_uid=STUDY + ".2", path=Path("/s/other/1.1"))
    with caplog.at_level(logging.WARNING):
        assert db.record_arrivals([stray]) == []
    with db.session() as s:
        (row,) = s.query(Instance).all()
        assert (row.series_uid, row.path) == (recorded.series_uid, str(recorded.path))
    study = db.get(STUDY)
    assert study is not None and study.state == State.SKIPPED and study.instance_count == 1
    assert "arrived in another series than recorded" in caplog.text
    assert "1.1" not in caplog.text.replace(study_key(STUDY), "")


def test_a_re_send_with_other_content_updates_the_digest_and_reopens(db: Database) -> None:
    from dataclasses import replace

    db.record_arrivals([replace(_arrival("1.1"), digest="a" * 64)])
    study = db.get(STUDY)
    assert study is not None
    assert db.instance_digests(study.id) == {Path("/s/1.1"): "a" * 64}
    db.transition(STUDY, State.COMPLETE)
    db.transition(STUDY, State.SKIPPED, "no model")
    db.record_arrivals([replace(_arrival("1.1", T0 + timedelta(minutes=1)), digest="b" * 64)])
    study = db.get(STUDY)
    assert study is not None and study.state == State.RECEIVING and study.instance_count == 1
    assert db.instance_digests(study.id) == {Path("/s/1.1"): "b" * 64}


def test_instances_of_an_older_version_gain_an_empty_digest(database_url: str) -> None:
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        for table in ("transition", "instance", "study"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    db = Database(database_url)
    db.create_schema()
    db.record_arrivals([_arrival("1.1")])
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instance DROP COLUMN digest"))
    db.dispose()
    db = Database(database_url)
    try:
        db.create_schema()
        assert "digest" in {c["name"] for c in inspect(db.engine).get_columns("instance")}
        study = db.get(STUDY)
        assert study is not None
        assert db.instance_digests(study.id) == {Path("/s/1.1"): ""}
    finally:
        db.dispose()


def test_the_accession_digest_is_kept_from_the_first_instance_that_has_one(db: Database) -> None:
    from dataclasses import replace

    from agent.logs import accession_digest

    db.record_arrivals([_arrival("1.1")])  # no AccessionNumber (Type 2, may be empty)
    study = db.get(STUDY)
    assert study is not None and study.accession_hash == ""
    db.record_arrivals([replace(_arrival("1.2"), accession_hash=accession_digest("A17 "))])
    db.record_arrivals([replace(_arrival("1.3"), accession_hash=accession_digest("B99"))])
    study = db.get(STUDY)
    assert study is not None
    assert study.accession_hash == accession_digest("A17") != ""
    assert "A17" not in study.accession_hash


def test_a_study_is_found_by_key_uid_or_accession_and_never_named_back(db: Database) -> None:
    from dataclasses import replace

    from agent.db.lookup import StudyNotFound, find_study
    from agent.logs import accession_digest

    other = STUDY + "9"
    db.record_arrivals(
        [
            replace(_arrival("1.1"), accession_hash=accession_digest("ACC42")),
            replace(_arrival("2.1", study=other), accession_hash=accession_digest("SHARED")),
            replace(_arrival("3.1", study=STUDY + "8"), accession_hash=accession_digest("SHARED")),
        ]
    )
    key = study_key(STUDY)
    for given in (key, key[:6], STUDY, "ACC42", f" {STUDY} "):
        assert find_study(db, given).study_uid == STUDY, given
    with pytest.raises(StudyNotFound) as none:
        find_study(db, "1.2.3.4.5")
    assert "1.2.3.4.5" not in str(none.value)
    with pytest.raises(StudyNotFound) as several:
        find_study(db, "SHARED")
    message = str(several.value)
    assert message.startswith("2 studies match: ") and study_key(other) in message
    assert "SHARED" not in message
