"""A study as hospitals send it: localizer, main series, an SR and a PDF, then late arrivals."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pydicom
import pytest

from agent.db.database import Database
from agent.db.schema import Study
from agent.db.states import State
from tests.e2e.outputs import fetch_outputs
from tests.support.agent import AgentProcess, cli, serving_agent, wait_for_study
from tests.support.dcmtk import storescu
from tests.support.foreign import write_key_objects, write_localizer, write_pdf, write_text_sr
from tests.support.orthanc import Orthanc
from tests.support.phantom import write_phantom_series
from tests.support.series import Series, write_enhanced_ct

pytestmark = pytest.mark.slow

DEADLINE = 240.0
NAME = "Müller^Jürgen Hans=山田^太郎"
PATIENT_ID = "4711-0815-K"


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        yield pacs


def _serving(
    orthanc: Orthanc, tmp_path: Path
) -> AbstractContextManager[tuple[AgentProcess, Database, int]]:
    """The agent as both tests run it: a short quiet time, results sent to `orthanc`."""
    destination = (orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    return serving_agent(tmp_path / "agent", quiet_seconds=2, destinations=[destination])


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _wait_reason(db: Database, study_uid: str, text: str, timeout: float, log: str) -> Study:
    deadline = time.monotonic() + timeout
    study = db.get(study_uid)
    while time.monotonic() < deadline:
        study = db.get(study_uid)
        if study is not None and study.state == State.DONE and text in study.reason:
            return study
        time.sleep(0.2)
    state = "unknown" if study is None else f"{study.state} ({study.reason})"
    raise AssertionError(f"study {state}, waited for done with {text!r}\n{log}")


def _results(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Our SEGs and SRs in the PACS (the foreign SR is series 90, ours 9901/9902)."""
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None
    found: dict[str, list[pydicom.Dataset]] = {"SEG": [], "SR": []}
    for item in orthanc.study_instances(study_id):
        tags = item["MainDicomTags"]
        if not str(tags.get("InstanceNumber", "")).strip():
            continue
        ds = pydicom.dcmread(io.BytesIO(orthanc.download_instance(item["ID"])))
        if int(ds.SeriesNumber) in (9901, 9902):
            found[str(ds.Modality)].append(ds)
    return found


def test_mixed_study_gives_one_seg_and_sr_then_revisions(orthanc: Orthanc, tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=41, rows=128, cols=128, pixel_spacing=3.0)
    study_uid = truth.study_uid
    for path in truth.files:  # a real-looking identity, in UTF-8, that must never be logged
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, "19470315"
        ds.save_as(path)
    main, late_slice = list(truth.files[:40]), truth.files[40]
    localizer = write_localizer(tmp_path / "loc", study_uid)
    sr = write_text_sr(tmp_path / "other", study_uid)
    pdf = write_pdf(tmp_path / "other", study_uid)
    with _serving(orthanc, tmp_path) as (agent, db, port):
        storescu([localizer, *main, sr, pdf], port=port, called_aet="PACS_AGENT")
        done = wait_for_study(db, study_uid, {State.DONE, State.FAILED}, DEADLINE, agent.log_tail)
        assert done.state == State.DONE, f"{done.reason}\n{agent.log_tail()}"
        assert done.revision == 1

        sent = {_sop(p) for p in [localizer, *main, sr, pdf]}
        # The foreign SR and PDF are skipped as sources; exactly one SEG and one SR remain.
        out = fetch_outputs(orthanc, study_uid, truth.series_uid, sent, tmp_path / "out")
        (ref_series,) = out.seg.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == truth.series_uid
        referenced = {
            str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence
        }
        assert referenced <= set(truth.sop_uids[:40])
        assert out.seg.InstanceNumber == 1 and out.sr.InstanceNumber == 1

        # Every object is stored and listed; only the CT series was an input.
        listing = cli("status", "--config", str(agent.config), done.study_key)
        assert listing.returncode == 0, listing.stderr
        assert "40 x CT Image Storage  input of ct-tissue" in listing.stdout
        assert "1 x Encapsulated PDF Storage  stored" in listing.stdout
        assert "1 x Basic Text SR Storage  stored" in listing.stdout
        assert "1 x CT Image Storage  stored" in listing.stdout  # the localizer
        assert "PHANTOM" not in listing.stdout
        assert NAME not in listing.stdout and PATIENT_ID not in listing.stdout

        # A late key-object selection leaves every input unchanged: nothing new is produced.
        storescu(
            [write_key_objects(tmp_path / "late", study_uid)], port=port, called_aet="PACS_AGENT"
        )
        again = _wait_reason(db, study_uid, "input unchanged", DEADLINE, agent.log_tail())
        assert again.revision == 1
        time.sleep(1)
        results = _results(orthanc, study_uid)
        assert [len(results["SEG"]), len(results["SR"])] == [1, 1]

        # A late slice of the main series changes the input: revision 2, same result series.
        storescu([late_slice], port=port, called_aet="PACS_AGENT")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            row = db.get(study_uid)
            if row is not None and row.revision == 2 and row.state == State.DONE:
                break
            assert row is None or row.state != State.FAILED, row.reason
            time.sleep(0.2)
        else:
            raise AssertionError(f"no revision 2\n{agent.log_tail()}")
        results = _results(orthanc, study_uid)
        assert sorted(int(ds.InstanceNumber) for ds in results["SEG"]) == [1, 2]
        assert sorted(int(ds.InstanceNumber) for ds in results["SR"]) == [1, 2]
        for kind in ("SEG", "SR"):
            first, second = sorted(results[kind], key=lambda ds: int(ds.InstanceNumber))
            assert first.SeriesInstanceUID == second.SeriesInstanceUID
            assert first.SOPInstanceUID != second.SOPInstanceUID
        assert all(str(ds.PatientName) == NAME for ds in results["SEG"] + results["SR"])
        newest = max(results["SEG"], key=lambda ds: int(ds.InstanceNumber))
        refs = {
            str(i.ReferencedSOPInstanceUID)
            for i in newest.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert truth.sop_uids[40] in refs
        assert agent.stop() == 0
    logs = agent.log_path.read_text(encoding="utf-8", errors="replace")
    assert "study complete" in logs and "study done" in logs  # the log did record the study
    for identity in (NAME, "Müller", "Jürgen", PATIENT_ID, "19470315", "PHANTOM^CT"):
        assert identity not in logs, identity
    # The audit trail (beside the spool by default) names the study by its key, and only so.
    audit = (tmp_path / "agent" / "audit.log").read_text(encoding="utf-8")
    entries = [json.loads(line) for line in audit.splitlines()]
    received = [e for e in entries if e["event"] == "instances-received"]
    assert sum(e["stored"] for e in received) == 45, audit  # 3 associations, 45 instances
    assert all(s["study"] == done.study_key for e in received for s in e["studies"]), audit
    for identity in (NAME, "Müller", "Jürgen", PATIENT_ID, "19470315", "PHANTOM^CT", study_uid):
        assert identity not in audit, identity


def test_enhanced_ct_gives_a_seg_on_its_frames(orthanc: Orthanc, tmp_path: Path) -> None:
    """One Enhanced CT instance, frames stored out of slice order, in and SEG + SR out."""
    truth = write_phantom_series(tmp_path / "ct", slices=40, rows=128, cols=128, pixel_spacing=3.0)
    first = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
    source = Series(truth.study_uid, truth.series_uid, str(first.FrameOfReferenceUID), truth.files)
    enhanced = write_enhanced_ct(tmp_path / "enhanced.dcm", source)
    header = pydicom.dcmread(enhanced, stop_before_pixels=True)
    with _serving(orthanc, tmp_path) as (agent, db, port):
        storescu([enhanced], port=port, called_aet="PACS_AGENT")
        done = wait_for_study(
            db, truth.study_uid, {State.DONE, State.FAILED, State.SKIPPED}, DEADLINE, agent.log_tail
        )
        assert done.state == State.DONE, f"{done.reason}\n{agent.log_tail()}"
        assert agent.stop() == 0
    sop = str(header.SOPInstanceUID)
    out = fetch_outputs(
        orthanc, truth.study_uid, str(header.SeriesInstanceUID), {sop}, tmp_path / "out"
    )
    # Every SEG frame lies where the Enhanced CT frame it references lies.
    positions = {
        number: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for number, item in enumerate(header.PerFrameFunctionalGroupsSequence, start=1)
    }
    for item in out.seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = item.DerivationImageSequence
        (ref,) = derivation.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == sop
        at = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert at == pytest.approx(positions[int(ref.ReferencedFrameNumber)])
    volumes = out.seg_volumes_ml()
    for label, expected in truth.volumes_ml.items():
        assert volumes[label] == pytest.approx(expected, rel=0.05), label
