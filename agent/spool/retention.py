"""Retention: delete the spooled files of finished studies once they are older than the limit.

`pacs-agent serve` runs the sweep in a daemon thread of its own, at start and then hourly, so
that neither the receiver nor the assembler loop ever waits on a large deletion.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent import audit
from agent.db.database import Database, utcnow
from agent.db.schema import Study
from agent.logs import log_context
from agent.periodic import Periodic
from agent.spool.layout import SpoolLayout

log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 3600.0

Now = Callable[[], datetime]


@dataclass(frozen=True)
class PurgeReport:
    """What one sweep deleted."""

    studies: int = 0
    files: int = 0
    bytes: int = 0


def purge_expired(
    db: Database,
    layout: SpoolLayout,
    *,
    retention: timedelta,
    now: datetime,
    cancelled: threading.Event | None = None,
) -> PurgeReport:
    """Delete the inputs, manifests, results and outbox of studies finished before the retention.

    Only `done` and `skipped` studies unchanged for longer than `retention` are touched; one
    that is receiving, complete, in flight or `failed` keeps everything. Each purge is recorded
    in the database (`Study.purged_at`). Files written after the cutoff are kept even in a purged
    study: they are instances of a late arrival that the assembler has not yet recorded, and
    they were acknowledged.
    """
    if retention <= timedelta(0):
        raise ValueError("retention must be positive; 0 days means no sweep at all")
    now = now.astimezone(UTC)
    cutoff = now - retention
    studies = files = size = 0
    for study in db.purgeable(cutoff):
        if cancelled is not None and cancelled.is_set():
            break
        with log_context(study=study.study_key):
            try:
                with db.purging(study.study_uid, cutoff, now) as claimed:
                    if not claimed:  # reopened (or purged elsewhere) since the query
                        continue
                    count, freed = _delete_before(_folders(layout, study), cutoff)
            except OSError as exc:
                # The purge is undone in the database, so the next sweep tries again.
                log.error("retention: files of a %s study kept: %s", study.state, exc.strerror)
                continue
            log.info(
                "retention: %s study purged after %s: %d files, %.1f MB",
                study.state,
                retention,
                count,
                freed / 1e6,
            )
            audit.study_purged(study.study_key, state=str(study.state), files=count)
        studies, files, size = studies + 1, files + count, size + freed
    return PurgeReport(studies, files, size)


def _folders(layout: SpoolLayout, study: Study) -> list[Path]:
    """The study's instance folder and every job folder made for it, past revisions included.

    Job ids start with the study key (agent.assembly.assembler), and keys all have one length,
    so the prefix names this study's jobs and no other's.
    """
    return [layout.study_dir(study.study_uid), *layout.jobs.glob(f"{study.study_key}-*")]


def _delete_before(folders: Iterable[Path], cutoff: datetime) -> tuple[int, int]:
    """Delete files last written before `cutoff`, then the folders left empty; (files, bytes)."""
    limit = cutoff.timestamp()
    count = freed = 0
    for folder in folders:
        for parent, dirs, names in os.walk(folder, topdown=False):
            for name in names:
                path = os.path.join(parent, name)
                try:
                    st = os.lstat(path)
                    if st.st_mtime >= limit:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                count, freed = count + 1, freed + st.st_size
            for name in dirs:
                # Not empty (a file kept above) or already gone: either way nothing to do.
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))
        with contextlib.suppress(OSError):
            folder.rmdir()
    return count, freed


class RetentionSweeper:
    """Runs `purge_expired` at start and then every `interval_seconds`, in a daemon thread."""

    def __init__(
        self,
        db: Database,
        layout: SpoolLayout,
        *,
        retention_days: float,
        interval_seconds: float = SWEEP_INTERVAL_SECONDS,
        now: Now = utcnow,
    ) -> None:
        self._db = db
        self._layout = layout
        self._retention = timedelta(days=retention_days)
        self._now = now
        self._loop = Periodic("retention sweep", self._sweep_and_log, interval_seconds)

    def sweep(self) -> PurgeReport:
        return purge_expired(
            self._db,
            self._layout,
            retention=self._retention,
            now=self._now(),
            cancelled=self._loop.stopping,
        )

    def start(self) -> None:
        """Start sweeping; with a retention of 0 days nothing is ever deleted."""
        if self._retention <= timedelta(0):
            log.info("retention: 0 days, finished studies are kept until deleted by hand")
            return
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _sweep_and_log(self) -> None:
        report = self.sweep()
        if report.studies:
            log.info(
                "retention sweep: %d studies purged, %.1f MB freed",
                report.studies,
                report.bytes / 1e6,
            )
