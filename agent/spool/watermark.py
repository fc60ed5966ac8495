"""Free-disk watermark of the spool: is there room to accept more instances right now?"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.settings import SpoolSettings
from agent.spool.measured import Measured, MonotonicClock

log = logging.getLogger(__name__)

# Free space is measured at most this often: a sender streams hundreds of instances a second,
# and a disk does not fill meaningfully in a second at that rate (a 2 GiB instance aside, and
# that one fails its write and gets 0xA700 anyway).
CACHE_SECONDS = 1.0
GB = 1_000_000_000  # decimal, as `df -H` and disk vendors count


@dataclass(frozen=True)
class DiskSpace:
    """What the filesystem holding the spool has left for an unprivileged writer."""

    free_bytes: int
    total_bytes: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True)
class Level:
    """The spool's state: `low` with a reason fit for a DICOM ErrorComment (no identity)."""

    low: bool
    reason: str = ""


DiskProbe = Callable[[Path], DiskSpace]


def statvfs_space(path: Path) -> DiskSpace:
    """Free space as statvfs reports it; f_bavail excludes the blocks reserved for root."""
    st = os.statvfs(path)
    return DiskSpace(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize)


class Watermark:
    """Says whether the spool is below its free-space floor; cheap enough for every C-STORE.

    Low means: free space below `min_free_percent` of the filesystem, or below `min_free_bytes`.
    The answer is cached for `cache_seconds` (monotonic clock) and shared by every receiver
    thread; the change to low is logged once as a warning and the recovery once as info.
    """

    def __init__(
        self,
        path: Path,
        *,
        min_free_percent: float,
        min_free_bytes: int,
        probe: DiskProbe = statvfs_space,
        clock: MonotonicClock = time.monotonic,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self._path = path
        self._min_percent = min_free_percent
        self._min_bytes = min_free_bytes
        self._probe = probe
        self._level = Level(low=False)
        self._checked = Measured(self._remeasure, seconds=cache_seconds, clock=clock)

    @classmethod
    def from_settings(cls, settings: SpoolSettings) -> Watermark:
        return cls(
            settings.path,
            min_free_percent=settings.min_free_percent,
            min_free_bytes=int(settings.min_free_gb * GB),
        )

    def check(self) -> Level:
        """The current level, measured again when the cached one is older than the cache time."""
        return self._checked.get()

    def _remeasure(self) -> Level:
        self._update(self._measure())
        return self._level

    def _measure(self) -> Level:
        try:
            space = self._probe(self._path)
        except OSError as exc:
            # A spool whose free space cannot be read cannot be trusted with a write either.
            return Level(low=True, reason=f"spool free space unknown: {exc.strerror}")
        floor_bytes = max(self._min_bytes, int(space.total_bytes * self._min_percent / 100))
        if space.free_bytes >= floor_bytes:
            return Level(low=False)
        return Level(
            low=True,
            reason=(
                f"spool disk low: {space.free_bytes / GB:.1f} GB "
                f"({space.free_percent:.0f}%) free, needs {floor_bytes / GB:.1f} GB"
            ),
        )

    def _update(self, level: Level) -> None:
        if level.low and not self._level.low:
            log.warning("refusing new instances until space returns: %s", level.reason)
        elif self._level.low and not level.low:
            log.info("spool disk space back above the floor: accepting instances again")
        self._level = level
