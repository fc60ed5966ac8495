"""The free-disk watermark: both floors, the one-second cache, transitions logged once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from agent.settings import SpoolSettings
from agent.spool.watermark import GB, DiskSpace, Watermark, statvfs_space


class Disk:
    """A filesystem whose free space the test sets; counts how often it is asked."""

    def __init__(self, free: float, total: float = 100 * GB) -> None:
        self.free = int(free)
        self.total = int(total)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, _path: Path) -> DiskSpace:
        with self._lock:
            self.calls += 1
        return DiskSpace(self.free, self.total)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _watermark(disk: Disk, clock: Clock | None = None, **floors: float) -> Watermark:
    return Watermark(
        Path("/spool"),
        min_free_percent=floors.get("percent", 10.0),
        min_free_bytes=int(floors.get("bytes", 5 * GB)),
        probe=disk,
        clock=clock or Clock(),
        cache_seconds=1.0,
    )


@pytest.mark.parametrize(
    ("free", "total", "percent", "floor_bytes", "low"),
    [
        (50 * GB, 100 * GB, 10, 5 * GB, False),
        (9 * GB, 100 * GB, 10, 5 * GB, True),  # under 10 %
        (4 * GB, 20 * GB, 10, 5 * GB, True),  # 20 % free, but under 5 GB
        (6 * GB, 20 * GB, 10, 5 * GB, False),
        (9 * GB, 100 * GB, 0, 5 * GB, False),  # the percentage floor switched off
        (1 * GB, 100 * GB, 0, 0, False),  # both floors switched off
    ],
)
def test_low_below_either_floor(
    free: int, total: int, percent: float, floor_bytes: int, low: bool
) -> None:
    level = _watermark(Disk(free, total), percent=percent, bytes=floor_bytes).check()
    assert level.low is low
    assert bool(level.reason) is low


def test_reason_fits_an_error_comment_and_names_no_path() -> None:
    level = _watermark(Disk(3.21 * GB, 2000 * GB)).check()
    assert level.low
    # ErrorComment is LO, 64 characters (PS3.5 6.2); the handler truncates, but the sense
    # must survive whole.
    assert len(level.reason) <= 64
    assert "3.2 GB" in level.reason and "200.0 GB" in level.reason
    assert "/spool" not in level.reason


def test_measured_at_most_once_per_cache_period() -> None:
    disk, clock = Disk(50 * GB), Clock()
    watermark = _watermark(disk, clock)
    for _ in range(100):
        watermark.check()
    assert disk.calls == 1
    disk.free = 1 * GB
    clock.t += 0.5
    assert not watermark.check().low  # still the cached answer
    clock.t += 0.5
    assert watermark.check().low
    assert disk.calls == 2


def test_threads_share_one_measurement() -> None:
    disk = Disk(50 * GB)
    watermark = _watermark(disk)
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(200):
            watermark.check()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert disk.calls == 1


def test_transitions_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    disk, clock = Disk(50 * GB), Clock()
    watermark = _watermark(disk, clock)
    caplog.set_level(logging.INFO, logger="agent.spool.watermark")

    def run(seconds: int) -> None:
        for _ in range(seconds):
            clock.t += 1.0
            watermark.check()

    run(3)
    disk.free = 1 * GB
    run(5)
    disk.free = 60 * GB
    run(5)
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO]
    assert "spool disk low" in records[0][1]
    assert "accepting instances again" in records[1][1]


def test_unreadable_free_space_counts_as_low() -> None:
    def broken(_path: Path) -> DiskSpace:
        raise FileNotFoundError(2, "No such file or directory")

    watermark = Watermark(Path("/gone"), min_free_percent=10, min_free_bytes=0, probe=broken)
    level = watermark.check()
    assert level.low
    assert level.reason == "spool free space unknown: No such file or directory"


def test_real_filesystem_and_settings(tmp_path: Path) -> None:
    space = statvfs_space(tmp_path)
    assert 0 < space.free_bytes <= space.total_bytes
    settings = SpoolSettings(path=tmp_path, min_free_percent=0, min_free_gb=0)
    assert not Watermark.from_settings(settings).check().low
    # Asking for more than the whole disk makes any real filesystem low.
    greedy = SpoolSettings(path=tmp_path, min_free_gb=space.total_bytes / GB + 1)
    assert Watermark.from_settings(greedy).check().low
