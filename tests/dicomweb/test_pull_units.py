"""Pulls, the poller and completeness by count, with a scripted source and a real database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from agent.assembly.assembler import Assembler
from agent.db.database import Database
from agent.db.schema import Transition
from agent.db.sources import BASELINE, FAILED, KNOWN, PULLED, SeenStudies
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.errors import ConfigError
from agent.pull.dimse import DimseSource
from agent.pull.poller import Poller
from agent.pull.puller import Puller
from agent.pull.service import Pulls
from agent.pull.source import SourceUnavailable, StudyNotFound
from agent.pull.verify import CountsBySender
from agent.receive.filemeta import encode_file_meta, read_file_meta
from agent.settings import ModelSettings, SelectRules, SourcePoll, load_settings
from agent.spool.digest import dataset_digest
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic
from tests.dicomweb.fakes import FakeSource
from tests.support.phantom import write_phantom_series

MODELS = (ModelSettings(select=SelectRules(min_slices=3)),)


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2024, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return self.t.timestamp()


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    return layout


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    truth = write_phantom_series(tmp_path_factory.mktemp("phantom"), slices=4, rows=32, cols=32)
    return list(truth.files)


def _assembler(db: Database, layout: SpoolLayout, **kwargs: object) -> tuple[Assembler, list[str]]:
    sent: list[str] = []
    assembler = Assembler(
        db,
        layout,
        quiet_seconds=60,
        models=MODELS,
        enqueue=lambda job, _path: sent.append(job),
        clock=kwargs.pop("clock", Clock()),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    return assembler, sent


def _complete_reason(db: Database, study_uid: str) -> str:
    study = db.get(study_uid)
    assert study is not None
    with db.session() as s:
        reasons = s.scalars(
            select(Transition.reason).where(
                Transition.study_id == study.id, Transition.state == State.COMPLETE
            )
        ).all()
    assert len(reasons) == 1, reasons
    return reasons[0]


# -- settings -----------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_dimse_source_settings_are_checked(
    tmp_path: Path, db: Database, layout: SpoolLayout
) -> None:
    dimse = '[[sources]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\nhost = "h"\n'
    with pytest.raises(ConfigError, match="a dimse source needs port"):
        load_settings(_config(tmp_path, dimse))
    with pytest.raises(ConfigError, match='url is for kind = "dicomweb"'):
        load_settings(_config(tmp_path, dimse + 'port = 104\nurl = "http://127.0.0.1:1"\n'))
    web = '[[sources]]\nname = "web"\nurl = "http://127.0.0.1:1"\n'
    with pytest.raises(ConfigError, match='ae_title: for kind = "dimse"'):
        load_settings(_config(tmp_path, web + 'ae_title = "PACS"\n'))
    (tmp_path / "ca.pem").write_text("")
    settings = load_settings(
        _config(
            tmp_path,
            dimse
            + 'port = 104\ncalling_ae_titles = ["CT1"]\n'
            + '[sources.tls]\nca_certificates = "ca.pem"\n'
            + '[sources.poll]\nmodalities = ["mr"]\n',
        )
    )
    (source,) = settings.sources
    assert (source.kind, source.ae_title, source.host, source.port) == ("dimse", "PACS", "h", 104)
    assert source.tls is not None and source.tls.ca_certificates == tmp_path / "ca.pem"
    assert source.calling_ae_titles == ("CT1",)
    assert source.poll is not None and source.poll.modalities == ("MR",)
    assert isinstance(Pulls(settings, db, layout).source(None), DimseSource)


def test_source_settings_are_checked(tmp_path: Path) -> None:
    two = '[[sources]]\nname = "a"\nurl = "http://127.0.0.1:1"\n'
    with pytest.raises(ConfigError, match="names must be unique"):
        load_settings(_config(tmp_path, two + two))
    with pytest.raises(ConfigError, match="needs url"):
        load_settings(_config(tmp_path, '[[sources]]\nname = "a"\n'))
    shared = 'calling_ae_titles = ["CT1"]\n'
    with pytest.raises(ConfigError, match="one source at most"):
        load_settings(_config(tmp_path, two + shared + two.replace('"a"', '"b"') + shared))
    settings = load_settings(
        _config(tmp_path, two + '[sources.poll]\nmodalities = ["ct"]\nstudy_date_days = 2\n')
    )
    (source,) = settings.sources
    assert source.poll is not None and source.poll.modalities == ("CT",)
    assert source.poll.interval_seconds == 60 and source.poll.backfill is False
    assert settings.study.verify_after_seconds == 2.0


# -- pulls --------------------------------------------------------------------------------------


def test_pull_writes_like_the_receiver_and_the_study_is_sealed_at_once(
    db: Database, layout: SpoolLayout, series: list[Path]
) -> None:
    source = FakeSource()
    uid = source.add(series)
    result = Puller(db, layout, max_instance_bytes=10**9).pull(source, uid)
    assert (result.stored, result.refused, result.expected) == (4, 0, 4)
    study = db.get(uid)
    assert study is not None and study.state == State.RECEIVING
    assert study.reason == "pulled from archive: 4 instances"
    for path in db.instance_paths(study.id):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == uid
        assert ds.file_meta.ImplementationClassUID  # our own meta group, as for a C-STORE
    assembler, sent = _assembler(db, layout)
    assembler.seal_quiet_studies()  # no quiet period: the pull got the whole study
    assert len(sent) == 1
    assert _complete_reason(db, uid) == "pulled from archive; 4 instances"


def test_pull_of_a_study_already_done_processes_it_again(
    db: Database, layout: SpoolLayout, series: list[Path]
) -> None:
    source = FakeSource()
    uid = source.add(series)
    puller = Puller(db, layout, max_instance_bytes=10**9)
    assembler, sent = _assembler(db, layout)
    puller.pull(source, uid)
    assembler.seal_quiet_studies()
    study = db.get(uid)
    assert study is not None and study.job_id is not None
    for state in (State.INFERRING, State.EXPORTING, State.DONE):
        db.transition(uid, state, expect_job=study.job_id)
    puller.pull(source, uid)
    assembler.seal_quiet_studies()
    assert len(sent) == 2  # re-processed on request, although its input is unchanged
    again = db.get(uid)
    assert again is not None and again.state == State.QUEUED and again.revision == 1


def test_unknown_study_and_refused_parts(
    db: Database, layout: SpoolLayout, series: list[Path], tmp_path: Path
) -> None:
    source = FakeSource()
    with pytest.raises(StudyNotFound, match="not in archive"):
        Puller(db, layout, max_instance_bytes=10**9).pull(source, "1.2.3.4")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    uid = source.add([*series, junk])
    result = Puller(db, layout, max_instance_bytes=10**9).pull(source, uid)
    assert (result.stored, result.refused) == (4, 1)


def test_a_pull_that_breaks_off_leaves_nothing(
    db: Database, layout: SpoolLayout, series: list[Path]
) -> None:
    source = FakeSource(break_after=2)
    uid = source.add(series)
    with pytest.raises(SourceUnavailable):
        Puller(db, layout, max_instance_bytes=10**9).pull(source, uid)
    assert db.get(uid) is None
    assert not list(layout.studies.glob("*/*/*.dcm"))


# -- the poller ---------------------------------------------------------------------------------


def test_poller_sets_a_baseline_then_pulls_each_new_study_once(
    db: Database, layout: SpoolLayout, series: list[Path], tmp_path: Path
) -> None:
    source = FakeSource()
    old = source.add(series)
    puller = Puller(db, layout, max_instance_bytes=10**9)
    poller = Poller(source, SourcePoll(interval_seconds=1), puller, db)
    assert poller.poll_once() == 0  # the baseline: what was there before is not pulled
    new = source.add(list(write_phantom_series(tmp_path / "new", slices=3, rows=16, cols=16).files))
    assert poller.poll_once() == 0  # found once; pulled when it holds still
    assert poller.poll_once() == 1
    assert poller.poll_once() == 0
    seen = SeenStudies(db)
    assert seen.outcome("archive", old).outcome == BASELINE  # type: ignore[union-attr]
    assert seen.outcome("archive", new).outcome == PULLED  # type: ignore[union-attr]
    # A restart: a new poller on the same database pulls nothing again.
    again = Poller(source, SourcePoll(interval_seconds=1), puller, db)
    assert again.poll_once() == 0 and again.poll_once() == 0
    assert source.calls.count("retrieve") == 1


def test_poller_retries_a_failed_pull_with_backoff_and_skips_known_studies(
    db: Database, layout: SpoolLayout, series: list[Path], tmp_path: Path
) -> None:
    source = FakeSource(break_after=1)
    puller = Puller(db, layout, max_instance_bytes=10**9)
    poller = Poller(source, SourcePoll(interval_seconds=30, backfill=True), puller, db)
    uid = source.add(series)
    poller.poll_once()
    assert poller.poll_once() == 0  # the retrieval breaks off
    seen = SeenStudies(db)
    row = seen.outcome("archive", uid)
    assert row is not None and row.outcome == FAILED and row.attempts == 1
    assert seen.due("archive", [uid]) == []  # not before its backoff
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert seen.due("archive", [uid], later) == [uid]
    # A study the agent already holds (it was pushed) is remembered as known, not pulled.
    pushed = write_phantom_series(tmp_path / "pushed", slices=3, rows=16, cols=16).files
    pushed_uid = source.add(list(pushed))
    ds = pydicom.dcmread(pushed[0], stop_before_pixels=True)
    db.record_arrivals(
        [
            ArrivedInstance(
                pushed_uid,
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                Path(pushed[0]),
                datetime.now(UTC),
            )
        ]
    )
    poller.poll_once()
    poller.poll_once()
    assert seen.outcome("archive", pushed_uid).outcome == KNOWN  # type: ignore[union-attr]


# -- completeness by count ----------------------------------------------------------------------


def _push(layout: SpoolLayout, db: Database, files: list[Path], ae: str, at: datetime) -> str:
    """Spool files as the C-STORE handler does, the sender's AE title in the meta group."""
    arrivals = []
    for file in files:
        ds = pydicom.dcmread(file)
        with file.open("rb") as fp:
            read_file_meta(fp)
            body = fp.read()
        path = layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        header = encode_file_meta(
            ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, ae
        )
        write_atomic(path, (header, body), layout.tmp)
        arrivals.append(
            ArrivedInstance(
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                path,
                at,
            )
        )
    db.record_arrivals(arrivals)
    return str(arrivals[0].study_uid)


def test_counts_matched_seals_before_the_quiet_period_with_few_questions(
    db: Database, layout: SpoolLayout, series: list[Path]
) -> None:
    source = FakeSource()
    clock = Clock()
    assembler, sent = _assembler(
        db, layout, clock=clock, counts=CountsBySender({"CT1": source}), verify_after=2.0
    )
    uid = _push(layout, db, series[:3], "CT1", clock.t)
    source.add(series)  # the archive holds 4; 3 have arrived
    for _ in range(20):  # 20 s of ticks, 4 apart
        clock.t += timedelta(seconds=0.25)
        assembler.seal_quiet_studies()
    # Asked at 2 s and 4 s of silence only, not at every tick.
    assert source.calls == ["count", "count"]
    assert not sent
    _push(layout, db, series[3:], "CT1", clock.t)
    clock.t += timedelta(seconds=2)
    assembler.seal_quiet_studies()
    assert len(sent) == 1
    assert _complete_reason(db, uid) == "counts matched (4 of 4 at archive); 4 instances"


def test_other_senders_and_unreachable_sources_wait_for_the_quiet_period(
    db: Database, layout: SpoolLayout, series: list[Path]
) -> None:
    source = FakeSource(down=True)
    clock = Clock()
    assembler, sent = _assembler(
        db, layout, clock=clock, counts=CountsBySender({"CT1": source}), verify_after=2.0
    )
    verified = _push(layout, db, series, "CT1", clock.t)
    source.add(series)
    clock.t += timedelta(seconds=10)
    assembler.seal_quiet_studies()
    assert not sent and source.calls  # asked, and it did not answer
    clock.t += timedelta(seconds=50)
    assembler.seal_quiet_studies()
    assert len(sent) == 1
    assert _complete_reason(db, verified) == "quiet period; 4 instances"


def test_a_pulled_instance_in_another_series_of_its_study_is_refused(
    db: Database, layout: SpoolLayout, series: list[Path], tmp_path: Path
) -> None:
    """A pull admits as the receivers do: a second copy of an instance in another series is
    refused (and counted), never stored beside the first; every instance has its digest."""
    source = FakeSource()
    uid = source.add(series)
    puller = Puller(db, layout, max_instance_bytes=10**9)
    puller.pull(source, uid)
    ds = pydicom.dcmread(series[0])
    ds.SeriesInstanceUID = generate_uid()
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    source.studies[uid] = [*series, moved]
    result = puller.pull(source, uid)
    assert (result.stored, result.refused) == (4, 1)
    assert len(list(layout.studies.glob("*/*/*.dcm"))) == 4
    study = db.get(uid)
    assert study is not None
    digests = db.instance_digests(study.id)
    assert len(digests) == 4
    assert all(digests[path] == dataset_digest(path) for path in digests)
