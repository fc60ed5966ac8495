"""The assembler with a fake clock and a recording enqueue: sealing, skipping, recovery."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from agent.assembly.assembler import WAITING_FOR_BROKER, Assembler
from agent.db.database import Database
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.dicom.uids import output_uids
from agent.domain import Manifest, ModelIdentity
from agent.errors import RetryableError
from agent.logs import instance_key
from agent.settings import ModelSettings
from agent.spool.digest import dataset_digest
from agent.spool.layout import SpoolLayout
from tests.support.data import dicom_files, shared_data
from tests.support.encodings import with_unknown_codec
from tests.support.foreign import (
    FOREIGN_WRITERS,
    PRIVATE_SOP_CLASS,
    write_localizer,
    write_text_sr,
)
from tests.support.phantom import write_phantom_series
from tests.support.series import write_with_localizer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """Wall clock and monotonic clock in step, unless a test steps the wall clock alone."""

    def __init__(self) -> None:
        self.at = T0
        self.wall_step = timedelta(0)

    def now(self) -> datetime:
        return self.at + self.wall_step

    def monotonic(self) -> float:
        return (self.at - T0).total_seconds()


class Recorder:
    def __init__(self) -> None:
        self.jobs: list[tuple[str, Path]] = []
        self.fail = False

    def __call__(self, job_id: str, manifest: Path) -> None:
        if self.fail:
            raise RetryableError("broker unavailable (test)")
        self.jobs.append((job_id, manifest))


@dataclass
class Rig:
    assembler: Assembler
    db: Database
    layout: SpoolLayout
    clock: FakeClock
    recorder: Recorder


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    layout = SpoolLayout(tmp_path / "spool")
    layout.create()
    db = Database(f"sqlite:///{tmp_path / 'agent.db'}")
    db.create_schema()
    clock, recorder = FakeClock(), Recorder()
    assembler = Assembler(
        db, layout, quiet_seconds=30, models=(ModelSettings(),), enqueue=recorder, clock=clock
    )
    return Rig(assembler, db, layout, clock, recorder)


def _spool(layout: SpoolLayout, files: list[Path], at: datetime) -> list[ArrivedInstance]:
    """Copy files into the spool as the receiver would, returning their arrivals."""
    arrivals = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        path = layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, path)
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
    return arrivals


def test_study_is_sealed_only_after_quiet_period(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=12, rows=32, cols=32)
    for arrival in _spool(rig.layout, list(truth.files), T0):
        rig.assembler.submit(arrival)
    assert rig.assembler.drain() == 12

    rig.clock.at = T0 + timedelta(seconds=29)
    rig.assembler.seal_quiet_studies()
    assert rig.db.get(truth.study_uid).state == State.RECEIVING  # type: ignore[union-attr]
    assert rig.recorder.jobs == []

    rig.clock.at = T0 + timedelta(seconds=30)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED
    ((job_id, manifest_path),) = rig.recorder.jobs
    assert job_id == study.job_id
    manifest = Manifest.from_json(manifest_path.read_text())
    assert manifest.study_uid == truth.study_uid
    (item,) = manifest.inputs
    assert item.series_uid == truth.series_uid
    assert manifest.models == ("ct-tissue",)
    assert manifest.revision == 1
    # Slice order, not arrival or file-name order.
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in item.files]
    assert sops == list(truth.sop_uids)


def test_study_without_usable_series_is_skipped_with_reason(rig: Rig) -> None:
    mr = dicom_files(shared_data("pacsman-dummy-mr"))[:5]
    arrivals = _spool(rig.layout, mr, T0)
    rig.db.record_arrivals(arrivals)
    rig.clock.at = T0 + timedelta(minutes=1)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(arrivals[0].study_uid)
    assert study is not None and study.state == State.SKIPPED
    assert "no CT series" in study.reason
    assert rig.recorder.jobs == []


def test_broker_down_waits_then_sends(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=6, rows=32, cols=32)
    rig.db.record_arrivals(_spool(rig.layout, list(truth.files), T0))
    rig.recorder.fail = True
    rig.clock.at = T0 + timedelta(minutes=1)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED
    assert study.reason.startswith(WAITING_FOR_BROKER)
    rig.assembler.retry_waiting()  # still down: nothing changes, nothing lost
    assert rig.db.get(truth.study_uid).reason.startswith(WAITING_FOR_BROKER)  # type: ignore[union-attr]
    rig.recorder.fail = False
    rig.assembler.retry_waiting()
    assert len(rig.recorder.jobs) == 1
    assert rig.db.get(truth.study_uid).reason == "sent to broker"  # type: ignore[union-attr]


def test_resume_recovers_unrecorded_instances_and_partial_writes(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    _spool(rig.layout, list(truth.files), T0)  # on disk, acknowledged, never recorded (crash)
    (rig.layout.tmp / "abc.part").write_bytes(b"half an instance")
    rig.assembler.resume(requeue_in_flight=True)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.instance_count == 5
    assert not list(rig.layout.tmp.glob("*.part"))


def test_resume_requeues_in_flight_jobs_only_for_the_embedded_broker(
    rig: Rig, tmp_path: Path
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    rig.db.record_arrivals(_spool(rig.layout, list(truth.files), T0))
    rig.clock.at = T0 + timedelta(minutes=1)
    rig.assembler.seal_quiet_studies()
    job = rig.db.get(truth.study_uid).job_id  # type: ignore[union-attr]
    rig.db.transition(truth.study_uid, State.INFERRING, expect_job=job)
    rig.recorder.jobs.clear()
    rig.assembler.resume(requeue_in_flight=False)  # Redis still holds the unacknowledged message
    assert rig.recorder.jobs == []
    rig.assembler.resume(requeue_in_flight=True)  # memory:// lost it with the process
    assert [j for j, _ in rig.recorder.jobs] == [job]


def test_damaged_instance_is_left_out_not_fatal(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=8, rows=32, cols=32)
    arrivals = _spool(rig.layout, list(truth.files), T0)
    rig.db.record_arrivals(arrivals)
    # An object whose identifying elements were fine but whose dataset breaks off inside a
    # sequence: the receiver stored it, selection must not trip over it.
    damaged = arrivals[0].path.with_name("1.2.3.4.dcm")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    truncated_sequence = (
        b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00ab"
    )
    damaged.write_bytes(buffer.getvalue() + truncated_sequence)
    rig.db.record_arrivals(
        [
            ArrivedInstance(
                truth.study_uid, "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", damaged, T0
            )
        ]
    )
    rig.clock.at = T0 + timedelta(minutes=1)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED
    (_, manifest_path) = rig.recorder.jobs[0]
    assert len(Manifest.from_json(manifest_path.read_text()).inputs[0].frames) == 8
    assert f"instance not usable: cannot read {instance_key(damaged)}" in caplog.text
    assert "1.2.3.4" not in caplog.text


def _finish(rig: Rig, study_uid: str) -> None:
    """Walk the queued job to done, as the workers would."""
    study = rig.db.get(study_uid)
    assert study is not None and study.state == State.QUEUED
    for state in (State.INFERRING, State.EXPORTING, State.DONE):
        rig.db.transition(study_uid, state, expect_job=study.job_id)


def _late(rig: Rig, files: list[Path], minutes: int) -> None:
    rig.db.record_arrivals(_spool(rig.layout, files, T0 + timedelta(minutes=minutes)))
    rig.clock.at = T0 + timedelta(minutes=minutes + 1)
    rig.assembler.seal_quiet_studies()


def test_late_arrival_outside_the_input_produces_nothing_new(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=8, rows=32, cols=32)
    _late(rig, list(truth.files), 0)
    _finish(rig, truth.study_uid)
    assert len(rig.recorder.jobs) == 1

    # A report and a re-sent slice: every model's input is the same.
    _late(rig, [write_text_sr(tmp_path / "sr", truth.study_uid), truth.files[3]], 10)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.DONE
    assert study.reason == "input unchanged; results of revision 1 stand"
    assert study.revision == 1
    assert len(rig.recorder.jobs) == 1


def test_late_slice_gives_a_new_revision(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=9, rows=32, cols=32)
    _late(rig, list(truth.files[:8]), 0)
    _finish(rig, truth.study_uid)
    _late(rig, [truth.files[8]], 10)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED and study.revision == 2
    first, second = (Manifest.from_json(path.read_text()) for _, path in rig.recorder.jobs)
    assert (first.revision, second.revision) == (1, 2)
    assert len(second.inputs[0].frames) == 9

    # Superseded before it finished, then re-sealed with the same input: still revision 2.
    _late(rig, [truth.files[0]], 20)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED and study.revision == 2


def test_foreign_objects_are_listed_and_never_an_input(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=6, rows=32, cols=32)
    foreign = [write(tmp_path / "other", truth.study_uid) for write in FOREIGN_WRITERS]
    localizer = write_localizer(tmp_path / "loc", truth.study_uid)
    _late(rig, [*foreign, localizer, *truth.files], 0)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED
    ((_, path),) = rig.recorder.jobs
    (item,) = Manifest.from_json(path.read_text()).inputs
    assert item.series_uid == truth.series_uid and len(item.frames) == 6
    contents = rig.db.series_contents(study.id)
    assert sum(count for _, _, count in contents) == len(foreign) + 1 + 6
    assert PRIVATE_SOP_CLASS in {sop_class for _, sop_class, _ in contents}


def test_study_of_foreign_objects_only_is_skipped(rig: Rig, tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    _late(rig, [write(tmp_path / "other", study_uid) for write in FOREIGN_WRITERS], 0)
    study = rig.db.get(study_uid)
    assert study is not None and study.state == State.SKIPPED
    assert study.reason == (
        "ct-tissue: no CT series (no image series; other objects: CT, DOC, KO, PR, RTSTRUCT, SR)"
    )


def test_series_without_a_decoder_ends_skipped_by_name(rig: Rig, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=4, rows=32, cols=32)
    for path in truth.files:
        with_unknown_codec(path, "1.2.840.10008.1.2.4.110", path)  # JPEG XL Lossless
    _late(rig, list(truth.files), 0)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.SKIPPED
    assert study.reason == (
        "ct-tissue: series 1 (CT, 4 instances):"
        " no decoder for JPEG XL Lossless (1.2.840.10008.1.2.4.110)"
    )


def test_stale_in_flight_jobs_are_sent_again_once_per_period(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    rig.db.record_arrivals(_spool(rig.layout, list(truth.files), T0))
    rig.clock.at = T0 + timedelta(minutes=1)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED and study.job_id is not None
    job, key = study.job_id, study.study_key
    assembler = Assembler(
        rig.db,
        rig.layout,
        quiet_seconds=30,
        models=(ModelSettings(),),
        enqueue=rig.recorder,
        clock=rig.clock,
        stale_after=60,
    )
    rig.recorder.jobs.clear()
    changed = study.updated_at.replace(tzinfo=UTC)  # the database's own (real) clock

    rig.clock.at = changed + timedelta(seconds=59)
    assembler.requeue_stale()
    assert rig.recorder.jobs == []  # the broker may simply be busy

    rig.clock.at = changed + timedelta(seconds=61)
    with caplog.at_level("WARNING", logger="agent.assembly.assembler"):
        assembler.requeue_stale()
    assert [j for j, _ in rig.recorder.jobs] == [job]
    assert f"study {key} stuck queued for 61 s" in caplog.text
    assert truth.study_uid not in caplog.text

    rig.clock.at = changed + timedelta(seconds=100)
    assembler.requeue_stale()  # sent 39 s ago: a full period again before the next try
    assert len(rig.recorder.jobs) == 1
    rig.clock.at = changed + timedelta(seconds=122)
    assembler.requeue_stale()
    assert len(rig.recorder.jobs) == 2

    # A worker picks it up: the state changed, so the period starts from that change.
    rig.db.transition(truth.study_uid, State.INFERRING, expect_job=job)
    moved = rig.db.get(truth.study_uid).updated_at.replace(tzinfo=UTC)  # type: ignore[union-attr]
    assembler = Assembler(  # a restarted serve: it remembers no earlier sends
        rig.db,
        rig.layout,
        quiet_seconds=30,
        models=(ModelSettings(),),
        enqueue=rig.recorder,
        clock=rig.clock,
        stale_after=60,
    )
    rig.clock.at = moved + timedelta(seconds=30)
    assembler.requeue_stale()
    assert len(rig.recorder.jobs) == 2
    rig.recorder.fail = True  # the broker is down: a warning, no crash, tried again later
    rig.clock.at = moved + timedelta(seconds=61)
    with caplog.at_level("WARNING", logger="agent.assembly.assembler"):
        assembler.requeue_stale()
    assert f"study {key} stuck inferring for 61 s" in caplog.text
    assert "cannot enqueue yet" in caplog.text
    rig.recorder.fail = False
    rig.clock.at = moved + timedelta(seconds=100)
    assembler.requeue_stale()
    assert len(rig.recorder.jobs) == 2
    rig.clock.at = moved + timedelta(seconds=125)
    assembler.requeue_stale()
    assert [j for j, _ in rig.recorder.jobs] == [job, job, job]

    rig.db.transition(truth.study_uid, State.EXPORTING, expect_job=job)
    rig.db.transition(truth.study_uid, State.DONE, expect_job=job)
    rig.clock.at = moved + timedelta(days=1)
    assembler.requeue_stale()  # ended studies are never sent again
    assert len(rig.recorder.jobs) == 3


def test_a_restart_gives_a_study_still_arriving_a_full_quiet_period(
    rig: Rig, tmp_path: Path
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    rig.db.record_arrivals(_spool(rig.layout, list(truth.files)[:3], T0))
    # The agent was down for ten minutes; its sender's association broke and it will re-send.
    rig.clock.at = T0 + timedelta(minutes=10)
    rig.assembler.resume(requeue_in_flight=False)
    rig.assembler.seal_quiet_studies()
    assert rig.db.get(truth.study_uid).state == State.RECEIVING  # type: ignore[union-attr]
    rig.clock.at = T0 + timedelta(minutes=10, seconds=30)
    rig.assembler.seal_quiet_studies()
    assert rig.db.get(truth.study_uid).state == State.QUEUED  # type: ignore[union-attr]


def test_a_localizer_inside_the_series_does_not_skip_the_study(rig: Rig, tmp_path: Path) -> None:
    series = write_with_localizer(tmp_path / "ct", 12)
    for arrival in _spool(rig.layout, list(series.files), T0):
        rig.assembler.submit(arrival)
    assert rig.assembler.drain() == 13
    rig.clock.at = T0 + timedelta(seconds=30)
    rig.assembler.seal_quiet_studies()
    study = rig.db.get(series.study_uid)
    assert study is not None and study.state == State.QUEUED, study and study.reason
    # The queued state says what was dropped, as the README promises ("dropped, with a note").
    assert study.reason == (
        "ct-tissue: 12 slices; 1 instance dropped: ImageType ORIGINAL\\PRIMARY\\LOCALIZER "
        "matches exclude pattern '*LOCALIZER*'"
    )
    ((_job_id, manifest_path),) = rig.recorder.jobs
    (item,) = Manifest.from_json(manifest_path.read_text()).inputs
    assert item.series_uid == series.series_uid
    assert len(item.frames) == 12
    spooled_scout = rig.layout.instance_path(
        series.study_uid, series.series_uid, series.sop_uids[-1]
    )
    assert spooled_scout not in item.files


def _digested(layout: SpoolLayout, files: list[Path], minutes: int) -> list[ArrivedInstance]:
    """As `_spool`, with the content digest each door computes."""
    return [
        replace(a, digest=dataset_digest(a.path))
        for a in _spool(layout, files, T0 + timedelta(minutes=minutes))
    ]


def _resend(rig: Rig, files: list[Path], minutes: int) -> None:
    rig.db.record_arrivals(_digested(rig.layout, files, minutes))
    rig.clock.at = T0 + timedelta(minutes=minutes + 1)
    rig.assembler.seal_quiet_studies()


def test_a_slice_re_sent_with_other_content_gives_a_new_revision(rig: Rig, tmp_path: Path) -> None:
    """Before, a slice re-sent under its UID with other pixels was "input unchanged": the
    results of the old pixels stood, and the new content was never processed."""
    truth = write_phantom_series(tmp_path / "ct", slices=8, rows=32, cols=32)
    _resend(rig, list(truth.files), 0)
    _finish(rig, truth.study_uid)

    # Byte for byte the same: nothing new.
    _resend(rig, [truth.files[3]], 10)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.DONE
    assert study.reason == "input unchanged; results of revision 1 stand"

    # The same UIDs, other pixels: processed again, and its results are other objects.
    ds = pydicom.dcmread(truth.files[3])
    pixels = bytearray(ds.PixelData)
    pixels[:64] = bytes(64)
    ds.PixelData = bytes(pixels)
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    _resend(rig, [changed], 20)
    study = rig.db.get(truth.study_uid)
    assert study is not None and study.state == State.QUEUED and study.revision == 2
    first, second = (Manifest.from_json(path.read_text()) for _, path in rig.recorder.jobs)
    sop = str(ds.SOPInstanceUID)
    assert dict(first.contents)[sop] != dict(second.contents)[sop]
    assert len(second.contents) == 8
    identity = ModelIdentity("ct-tissue", "1", "m", "1.2.3")
    sops = [s for s, _ in second.contents]
    before = output_uids(truth.study_uid, sops, identity, dict(first.contents))
    after = output_uids(truth.study_uid, sops, identity, dict(second.contents))
    assert before.seg_instance != after.seg_instance
    assert before.seg_series == after.seg_series


def test_the_manifest_keeps_the_contents_and_older_ones_have_none() -> None:
    import json

    manifest = Manifest("job", "1.2.3", (), contents=(("1.2.3.4", "a" * 64),))
    assert Manifest.from_json(manifest.to_json()) == manifest
    older = json.loads(manifest.to_json())
    del older["contents"]  # written before digests were kept
    assert Manifest.from_json(json.dumps(older)).contents == ()
