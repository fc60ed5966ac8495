"""Hostile input on the DICOM port: thousands of malformed PDUs from concurrent peers, and
C-STORE datasets mutated from real CT files.

Every case is generated from a seeded random source, so a failure reproduces. The receiver
runs in this process, so an exception in one of pynetdicom's threads fails the test (pytest
reports unhandled thread exceptions, and warnings are errors).
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.connections import close_connection
from agent.logs import PeerErrorFilter
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import storescu
from tests.support.hostile import DatasetMutator, associate_rq, mutate_pdu, send_and_hang_up
from tests.support.phantom import write_phantom_series
from tests.support.receiver import Receiver, loopback_settings

SEED = 20261123
RAW_CASES = 1000
ASSOCIATE_CASES = 2000
IDLE_TIMEOUT = 2.0
DATASET_CASES = 1000
MEMORY_BOUND_BYTES = 100 * 1024 * 1024
# PS3.4 B.2.3 statuses a damaged dataset may get; 0xC0FF ("internal error") is not one.
EXPECTED_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0xC001}


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # pynetdicom logs each bad PDU with its traceback, which pytest's log capture would keep
    # (frames and all) for the whole test: memory the service does not hold, as its log
    # handler writes one line and lets go. They go to a handler like the service's.
    peer_log = logging.getLogger("pynetdicom")
    monkeypatch.setattr(peer_log, "propagate", False)
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(PeerErrorFilter())
    peer_log.addHandler(handler)
    settings = loopback_settings(
        network_timeout_seconds=IDLE_TIMEOUT, acse_timeout_seconds=IDLE_TIMEOUT, max_associations=8
    )
    with Receiver(tmp_path / "spool", settings) as rx:
        yield rx
    peer_log.removeHandler(handler)


def _echo(port: int) -> int:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    try:
        assert assoc.is_established, (
            "the listener no longer accepts associations: "
            f"rejected={assoc.is_rejected} aborted={assoc.is_aborted} "
            f"active={threading.active_count()}"
        )
        status = int(assoc.send_c_echo().Status)
        assoc.release()
    finally:
        close_connection(assoc)  # pynetdicom as sender may leave it open when refused
    return status


def _threads_settle(baseline: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and threading.active_count() > baseline:
        time.sleep(0.1)
    return threading.active_count()


def test_malformed_pdus_from_concurrent_peers_leave_the_listener_serving(
    receiver: Receiver, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    threads_before = threading.active_count()
    template = associate_rq()
    cases: list[tuple[bytes, float]] = []
    for _ in range(RAW_CASES):  # random bytes, any length, maybe a valid PDU type byte first
        head = bytes([rng.randrange(1, 8)]) if rng.random() < 0.5 else b""
        cases.append((head + rng.randbytes(rng.randint(0, 2048)), 0.0))
    for index in range(ASSOCIATE_CASES):  # mutated association requests, half waiting for a reply
        cases.append((mutate_pdu(template, rng), 0.05 if index % 2 else 0.0))
    rng.shuffle(cases)
    rss_before = psutil.Process().memory_info().rss

    # Eight hostile peers at a time, as a scanner would connect.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda case: send_and_hang_up(receiver.port, case[0], linger=case[1]), cases))
    # A peer that left half a PDU behind holds a slot until the network timeout at most.
    _threads_settle(threads_before, IDLE_TIMEOUT * 3 + 10)
    # PDUs declaring up to 4 GiB were among them: nothing was buffered by their word.
    assert psutil.Process().memory_info().rss - rss_before < MEMORY_BOUND_BYTES
    assert _echo(receiver.port) == 0x0000
    # Every association thread of a dropped peer ended, and so do the echo's own.
    assert _threads_settle(threads_before, IDLE_TIMEOUT * 3 + 10) <= threads_before + 1
    assert receiver.arrivals == []

    # And a normal study still goes through, with a real sender.
    truth = write_phantom_series(tmp_path / "ct", slices=5, rows=32, cols=32)
    storescu(truth.files, port=receiver.port, called_aet="PACS_AGENT")
    assert {a.sop_uid for a in receiver.arrivals} == set(truth.sop_uids)


def test_mutated_datasets_get_a_status_each_and_leave_the_listener_serving(
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real CT files (implicit VR, and a vendor's JPEG 2000 with private tags), with lying
    element lengths, flipped bytes, truncations and splices, sent as C-STOREs."""
    sources = [
        DatasetMutator(path)
        for path in [
            *dicom_files(shared_data("dcmqi", "ct-3slice")),
            *dicom_files(shared_data("ct-siemens-j2k"))[:2],
        ]
    ]
    # Send each file's bytes as they are, not decoded and re-encoded by pynetdicom.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    rng = random.Random(SEED + 1)
    rss_before = psutil.Process().memory_info().rss
    case_file = tmp_path / "case.dcm"
    ae = AE(ae_title="FUZZER")
    for syntax in {source.transfer_syntax for source in sources}:
        ae.add_requested_context(CTImageStorage, syntax)  # one context per syntax
    statuses: list[int] = []
    assoc = None
    for _ in range(DATASET_CASES):
        if assoc is None or not assoc.is_established:
            if assoc is not None:
                close_connection(assoc)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACS_AGENT")
            assert assoc.is_established
        case_file.write_bytes(rng.choice(sources).mutate(rng))
        response = assoc.send_c_store(case_file)
        if "Status" in response:  # an empty response: the association ended under it
            statuses.append(int(response.Status))
    assert assoc is not None
    assoc.release()
    close_connection(assoc)

    assert set(statuses) <= EXPECTED_STATUSES, f"unexpected statuses {set(statuses)}"
    assert len(statuses) >= DATASET_CASES * 0.9, "most cases must get an answer"
    assert {0x0000, 0xC000} <= set(statuses), "the cases must reach both outcomes"
    assert not [r for r in caplog.records if r.name.startswith("agent") and r.levelno >= 40]
    assert psutil.Process().memory_info().rss - rss_before < MEMORY_BOUND_BYTES
    assert _echo(receiver.port) == 0x0000
