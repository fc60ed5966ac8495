"""The audit trail: one JSON line per association, per association's instances, per start."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent import audit
from agent.logs import study_key
from agent.settings import (
    AllowedCaller,
    DestinationTls,
    LoggingSettings,
    ReceiverTls,
    Settings,
    load_settings,
)
from agent.spool.watermark import GB, DiskSpace, Watermark
from agent.tls import client_context
from tests.support.agent import cli, write_config
from tests.support.dcmtk import storescu
from tests.support.pki import make_pki
from tests.support.receiver import Receiver, loopback_settings, minimal_ct

NAME, PATIENT_ID, BIRTH_DATE = "Auditkind^Erika", "PID-0815-AUD", "19610203"


@pytest.fixture
def audit_log(tmp_path: Path) -> Iterator[Path]:
    """The audit trail configured as the CLI does it, into a file under tmp_path."""
    path = tmp_path / "audit" / "audit.log"
    settings = Settings(logging=LoggingSettings(audit_file=str(path)))
    assert audit.configure_audit(settings) == path
    try:
        yield path
    finally:
        audit.close_audit()


def _entries(path: Path) -> list[dict[str, Any]]:
    """Every line of the audit file, each of which must be one JSON object."""
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def _wait_for(path: Path, event: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    """The `event` lines, once there are `count` of them (the receiver writes from its threads)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in _entries(path) if entry["event"] == event]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{event}: {found}\n{path.read_text()}"
            return found
        time.sleep(0.05)


def _with_identity(ds: Dataset) -> Dataset:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    return ds


def _study_files(folder: Path, count: int) -> tuple[str, list[Path]]:
    """`count` CT instances of one new study, with a patient identity, as DICOM files."""
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(count):
        ds = _with_identity(minimal_ct())
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def _sender(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def _associate(ae: AE, port: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")


def test_an_association_gives_one_accepted_and_one_received_line(
    audit_log: Path, tmp_path: Path
) -> None:
    study_uid, files = _study_files(tmp_path / "in", 3)
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        storescu(files, port=rx.port, called_aet="PACS_AGENT", calling_aet="CT_ROOM_1")
        (received,) = _wait_for(audit_log, "instances-received")
        assert len(rx.spooled()) == 3
    (accepted,) = _wait_for(audit_log, "association-accepted")
    assert accepted["source"]["ae_title"] == "CT_ROOM_1"
    assert accepted["source"]["address"] == "127.0.0.1"
    assert isinstance(accepted["source"]["port"], int)
    assert accepted["destination"] == {"ae_title": "PACS_AGENT"}
    assert accepted["event_id"] == {
        "code": "110114",
        "meaning": "User Authentication",
        "scheme": "DCM",
    }
    assert (accepted["action"], accepted["outcome"]) == ("E", 0)

    assert received["studies"] == [{"study": study_key(study_uid), "stored": 3, "refused": 0}]
    assert (received["stored"], received["refused"], received["ended"]) == (3, 0, "released")
    assert received["event_id"]["code"] == "110104"
    assert (received["action"], received["outcome"]) == ("C", 0)
    assert received["source"]["ae_title"] == "CT_ROOM_1"
    assert received["time"].endswith("Z") and received["pid"] == os.getpid()

    text = audit_log.read_text(encoding="utf-8")
    assert [entry["event"] for entry in _entries(audit_log)] == [
        "association-accepted",
        "instances-received",
    ]
    for identity in (NAME, "Auditkind", PATIENT_ID, BIRTH_DATE, study_uid):
        assert identity not in text, identity


def test_refused_caller_gives_a_rejected_line_with_reason_and_address(
    audit_log: Path, tmp_path: Path
) -> None:
    settings = loopback_settings(allowed_callers=(AllowedCaller(ae_title="CT_ROOM_1"),))
    with Receiver(tmp_path / "spool", settings) as rx:
        assoc = _associate(_sender("STRANGER"), rx.port)
        assert assoc.is_rejected
        (rejected,) = _wait_for(audit_log, "association-rejected")
    assert rejected["source"]["ae_title"] == "STRANGER"
    assert rejected["source"]["address"] == "127.0.0.1"
    assert rejected["destination"] == {"ae_title": "PACS_AGENT"}
    assert rejected["reason"] == "calling AE title 'STRANGER' is not an allowed caller"
    assert rejected["rejection"] == {
        "result": 1,
        "source": 1,
        "reason": 3,
        "meaning": "rejected-permanent: calling-AE-title-not-recognized",
    }
    assert rejected["event_id"]["code"] == "110113"
    assert rejected["event_type"]["code"] == "110126"
    assert rejected["outcome"] == 4
    assert not [e for e in _entries(audit_log) if e["event"] == "association-accepted"]


def test_too_many_associations_is_recorded_from_pynetdicom_itself(
    audit_log: Path, tmp_path: Path
) -> None:
    with Receiver(tmp_path / "spool", loopback_settings(max_associations=1)) as rx:
        first = _associate(_sender(), rx.port)
        assert first.is_established
        try:
            second = _associate(_sender("SECOND"), rx.port)
            assert second.is_rejected
            (rejected,) = _wait_for(audit_log, "association-rejected")
        finally:
            first.release()
    assert rejected["source"]["ae_title"] == "SECOND"
    assert rejected["rejection"]["meaning"] == "rejected-transient: local-limit-exceeded"


def test_spool_low_rejection_says_why(audit_log: Path, tmp_path: Path) -> None:
    def scarce(_path: Path) -> DiskSpace:
        return DiskSpace(free_bytes=1 * GB, total_bytes=1000 * GB)

    root = tmp_path / "spool"
    watermark = Watermark(root, min_free_percent=10, min_free_bytes=5 * GB, probe=scarce)
    with Receiver(root, loopback_settings(), watermark) as rx:
        assert _associate(_sender(), rx.port).is_rejected
        (rejected,) = _wait_for(audit_log, "association-rejected")
    assert rejected["reason"].startswith("spool disk low")
    assert rejected["rejection"]["meaning"] == "rejected-transient: temporary-congestion"


def test_aborted_association_counts_stored_and_refused_per_study(
    audit_log: Path, tmp_path: Path
) -> None:
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        assoc = _associate(_sender(), rx.port)
        assert assoc.is_established
        stored = _with_identity(minimal_ct())
        assert assoc.send_c_store(stored).Status == 0x0000
        unreadable = _with_identity(minimal_ct())
        del unreadable.StudyInstanceUID
        assert assoc.send_c_store(unreadable).Status == 0xC001
        assoc.abort()
        (received,) = _wait_for(audit_log, "instances-received")
    assert received["ended"] == "aborted"
    assert received["studies"] == [
        {"study": study_key(str(stored.StudyInstanceUID)), "stored": 1, "refused": 0},
        {"study": None, "stored": 0, "refused": 1},
    ]
    assert (received["stored"], received["refused"], received["outcome"]) == (1, 1, 4)
    assert NAME not in audit_log.read_text(encoding="utf-8")


def test_echo_only_association_writes_no_instances_line(audit_log: Path, tmp_path: Path) -> None:
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        assoc = _associate(_sender(), rx.port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        _wait_for(audit_log, "association-accepted")
        time.sleep(0.3)
    assert [e["event"] for e in _entries(audit_log)] == ["association-accepted"]


def test_config_loaded_records_path_and_digest_never_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hunter2-audit-secret-value"
    monkeypatch.setenv("PACS_AGENT_AUDIT_TEST_PASSWORD", secret)
    with socket.socket() as busy:  # serve starts, records its start, and cannot listen
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(
            tmp_path,
            port=busy.getsockname()[1],
            destinations=[("PACS", "127.0.0.1", 104)],
            extra=(
                "[destinations.tls]\n"
                'certificate = "client.pem"\n'
                'private_key = "client.key"\n'
                'private_key_password = { env = "PACS_AGENT_AUDIT_TEST_PASSWORD" }\n'
            ),
        )
        result = cli("serve", "--config", str(config))
    assert result.returncode == 1, result.stderr
    path = load_settings(config).audit_path
    assert path == tmp_path / "audit.log"  # beside the spool, by default
    loaded, stopped = _entries(path)
    assert loaded["event"] == "config-loaded" and loaded["role"] == "serve"
    assert loaded["config"] == {
        "path": str(config),
        "sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
    }
    assert loaded["event_id"]["code"] == "110100"
    assert loaded["event_type"]["code"] == "110120"
    assert stopped["event"] == "application-stopped"
    assert stopped["outcome"] == 8 and "cannot listen" in stopped["reason"]
    text = path.read_text(encoding="utf-8")
    assert secret not in text and "PACS_AGENT_AUDIT_TEST_PASSWORD" not in text
    assert path.stat().st_mode & 0o007 == 0  # not for everyone: it names peers and studies


def test_objects_exported_counts_failures_by_status(audit_log: Path) -> None:
    key = study_key(generate_uid())
    audit.objects_exported(
        "pacs0",
        key,
        2,
        {0x0000: 2},
        peer=audit.Peer("ORTHANC", "10.0.0.5", 4242),
        objects=("SEG", "SR"),
    )
    audit.objects_exported("pacs0", key, 3, {0xB007: 1, 0xA700: 1})
    full, partial = _entries(audit_log)
    assert full["event"] == "objects-exported" and full["study"] == key
    assert full["destination"] == {
        "name": "pacs0",
        "ae_title": "ORTHANC",
        "address": "10.0.0.5",
        "port": 4242,
    }
    assert (full["count"], full["failed"], full["outcome"]) == (2, 0, 0)
    assert full["statuses"] == {"0x0000": 2} and full["objects"] == ["SEG", "SR"]
    assert (full["event_id"]["code"], full["action"]) == ("110104", "R")
    # A warning (0xB007) is stored all the same; the refused one and the unanswered one fail.
    assert (partial["count"], partial["failed"], partial["outcome"]) == (3, 2, 4)
    assert partial["statuses"] == {"0xA700": 1, "0xB007": 1}


def test_study_purged_line(audit_log: Path) -> None:
    audit.study_purged("0123456789abcdef", state="done", files=41)
    (entry,) = _entries(audit_log)
    assert entry["event"] == "study-purged" and entry["study"] == "0123456789abcdef"
    assert (entry["event_id"]["code"], entry["action"], entry["files"]) == ("110105", "D", 41)


def test_without_configuration_every_call_is_a_no_op(tmp_path: Path) -> None:
    audit.close_audit()
    peer = audit.Peer("X", "127.0.0.1", 1)
    audit.association(True, source=peer, destination=peer)
    audit.instances_received(
        source=peer, destination=peer, studies=[audit.StudyCount("k", 1)], ended="released"
    )
    audit.objects_exported("pacs0", "k", 1, {0: 1})
    audit.config_loaded(None, None, role="serve")
    assert not logging.getLogger(audit.AUDIT_LOGGER).handlers


def test_a_failing_audit_file_never_raises_into_the_caller(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The audit file's own handler (pytest may add a capture handler of its own).
    (handler,) = [
        h
        for h in logging.getLogger(audit.AUDIT_LOGGER).handlers
        if isinstance(h, logging.FileHandler)
    ]

    def broken(_record: logging.LogRecord) -> str:
        raise OSError("disk gone")

    # A failure while the handler formats or writes (a full disk, an unserialisable value):
    # logging's handler reports it through handleError instead of raising.
    monkeypatch.setattr(handler, "format", broken)
    monkeypatch.setattr(logging, "raiseExceptions", False)
    audit.study_purged("k", state="done", files=1)  # does not raise


def test_audit_file_setting(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[spool]\npath = "data/spool"\n')
    assert load_settings(config).audit_path == tmp_path / "data" / "audit.log"
    config.write_text('[logging]\naudit_file = "logs/audit.jsonl"\n')
    assert load_settings(config).audit_path == tmp_path / "logs" / "audit.jsonl"
    config.write_text('[logging]\naudit_file = ""\n')
    settings = load_settings(config)
    assert settings.audit_path is None
    assert audit.configure_audit(settings) is None


def test_lines_from_many_threads_stay_whole(audit_log: Path) -> None:
    def burst() -> None:
        for _ in range(50):
            audit.study_purged("k" * 16, state="done", files=1)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_entries(audit_log)) == 200


def test_refused_instance_is_counted_under_its_study(audit_log: Path, tmp_path: Path) -> None:
    """An instance refused for its content is counted under its study, never described."""
    with Receiver(tmp_path / "spool", loopback_settings()) as rx:
        assoc = _associate(_sender(), rx.port)
        ds = _with_identity(minimal_ct())
        del ds.SeriesInstanceUID  # its study is known, its place in the spool is not
        assert assoc.send_c_store(ds).Status == 0xC001
        assoc.release()
        (received,) = _wait_for(audit_log, "instances-received")
    assert received["studies"] == [
        {"study": study_key(str(ds.StudyInstanceUID)), "stored": 0, "refused": 1}
    ]
    assert received["outcome"] == 8
    text = audit_log.read_text(encoding="utf-8")
    assert NAME not in text and PATIENT_ID not in text


def test_tls_handshake_refused_is_a_security_alert(audit_log: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ReceiverTls(
        certificate=pki.server_cert,
        private_key=pki.server_key,
        ca_certificates=pki.ca,
        require_client_certificate=True,
    )
    with Receiver(tmp_path / "spool", loopback_settings(tls=tls)) as rx:
        ae = _sender()
        ae.acse_timeout = ae.network_timeout = 10
        no_certificate = client_context(DestinationTls(ca_certificates=pki.ca))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assoc = ae.associate(
                "127.0.0.1", rx.port, ae_title="PACS_AGENT", tls_args=(no_certificate, "localhost")
            )
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.close()  # pynetdicom leaves it open when the peer hung up first
        assert not assoc.is_established
        (refused,) = _wait_for(audit_log, "tls-refused")
    assert refused["source"]["address"] == "127.0.0.1"
    assert "certificate" in refused["reason"]
    assert (refused["event_id"]["code"], refused["event_type"]["code"]) == ("110113", "110126")
