"""Back-pressure over real associations: a low spool and an oversized instance are refused.

The disk is injected (a watermark whose free space the test sets), so the full-disk behaviour
runs everywhere without filling or mounting anything.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.settings import AllowedCaller
from agent.spool.watermark import GB, DiskSpace, Watermark
from tests.support.dcmtk import storescu
from tests.support.receiver import Receiver, loopback_settings, minimal_ct

PLENTY, SCARCE = 500 * GB, 1 * GB


class Disk:
    """The spool's filesystem as the test wants it: 1000 GB, of which `free` are free."""

    def __init__(self) -> None:
        self.free = PLENTY
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, _path: Path) -> DiskSpace:
        with self._lock:
            self.calls += 1
        return DiskSpace(free_bytes=self.free, total_bytes=1000 * GB)


class Rig(Receiver):
    """The receiver with a watermark on a `Disk`, so the test decides when the spool is low."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.disk = Disk()
        # No cache: each check measures, so the test's change of free space shows at once.
        watermark = Watermark(
            root, min_free_percent=10, min_free_bytes=5 * GB, probe=self.disk, cache_seconds=0.0
        )
        super().__init__(root, loopback_settings(**settings), watermark)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "spool") as rx:
        yield rx


def _sender(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def _ct(pixel_bytes: int = 32) -> Dataset:
    ds = minimal_ct()
    ds.BitsAllocated = 8
    ds.PixelData = b"\0" * pixel_bytes
    ds["PixelData"].VR = "OB"
    return ds


def _rejection(ae: AE, port: int) -> tuple[int, int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    return (int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0))


def test_low_spool_refuses_then_recovers_without_restart(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.spool.watermark")
    sender = _sender()
    assoc = sender.associate("127.0.0.1", rig.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    rig.disk.free = SCARCE
    try:
        # On an association that was already open: every instance refused, nothing written.
        statuses = [assoc.send_c_store(_ct()) for _ in range(3)]
    finally:
        assoc.release()
    assert [rsp.Status for rsp in statuses] == [0xA700] * 3
    assert str(statuses[0].ErrorComment).startswith("spool disk low: 1.0 GB")
    assert rig.spooled() == [] and rig.arrivals == []
    assert list(rig.layout.tmp.iterdir()) == []

    # A new association: rejected-transient, service provider (presentation), temporary
    # congestion (PS3.8 Table 9-21).
    assert _rejection(sender, rig.port) == (0x02, 0x03, 0x01)

    # Space returns: the same sender, the same listener, no restart.
    rig.disk.free = PLENTY
    assoc = sender.associate("127.0.0.1", rig.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    try:
        ds = _ct()
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert [p.stem for p in rig.spooled()] == [str(ds.SOPInstanceUID)]
    assert len(rig.arrivals) == 1

    # One warning going low and one info coming back, however many instances were refused.
    levels = [r.levelno for r in caplog.records if r.name == "agent.spool.watermark"]
    assert levels == [logging.WARNING, logging.INFO]


def test_not_allowed_caller_is_refused_permanently_even_while_low(tmp_path: Path) -> None:
    with Rig(tmp_path / "spool", allowed_callers=(AllowedCaller(ae_title="MODALITY"),)) as rig:
        rig.disk.free = SCARCE
        calls = rig.disk.calls
        # Access control answers first; the watermark's gate leaves a rejected association
        # alone (one A-ASSOCIATE-RJ, and a stranger is not invited to retry).
        assert _rejection(_sender("STRANGER"), rig.port) == (0x01, 0x01, 0x03)
        assert rig.disk.calls == calls
        assert _rejection(_sender("MODALITY"), rig.port) == (0x02, 0x03, 0x01)
        rig.disk.free = PLENTY
        assoc = _sender("MODALITY").associate("127.0.0.1", rig.port, ae_title="PACS_AGENT")
        assert assoc.is_established
        assoc.release()


def test_storescu_sees_the_congestion_and_succeeds_later(rig: Rig, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ds = _ct()
    ds.save_as(path, enforce_file_format=True)
    rig.disk.free = SCARCE
    refused = storescu([path], port=rig.port, called_aet="PACS_AGENT", check=False)
    assert refused.returncode != 0
    assert "Temporary Congestion" in refused.stdout + refused.stderr
    assert rig.spooled() == []
    rig.disk.free = PLENTY
    storescu([path], port=rig.port, called_aet="PACS_AGENT")
    assert [p.stem for p in rig.spooled()] == [str(ds.SOPInstanceUID)]


def test_oversized_instance_is_refused_and_not_written(tmp_path: Path) -> None:
    with Rig(tmp_path / "spool", max_instance_bytes=4096) as rig:
        assoc = _sender().associate("127.0.0.1", rig.port, ae_title="PACS_AGENT")
        assert assoc.is_established
        try:
            big = assoc.send_c_store(_ct(pixel_bytes=8192))
            small = _ct(pixel_bytes=1024)
            small_status = assoc.send_c_store(small).Status
        finally:
            assoc.release()
        assert big.Status == 0xA700
        assert str(big.ErrorComment) == "instance over the 4096-byte limit"
        assert small_status == 0x0000
        assert [p.stem for p in rig.spooled()] == [str(small.SOPInstanceUID)]
        assert [a.sop_uid for a in rig.arrivals] == [str(small.SOPInstanceUID)]
