"""Start-up scan: instances on disk the database does not know (acknowledged before a crash)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from agent.db.values import ArrivedInstance
from agent.dicom.files import read_header
from agent.errors import PermanentError
from agent.spool.layout import SpoolLayout

log = logging.getLogger(__name__)


def clear_partial_writes(layout: SpoolLayout) -> int:
    """Remove temp files of writes that never completed; they were never acknowledged."""
    count = 0
    for stray in layout.tmp.glob("*.part"):
        stray.unlink(missing_ok=True)
        count += 1
    return count


def unknown_instances(layout: SpoolLayout, known: set[str]) -> Iterator[ArrivedInstance]:
    """Instances in the spool that are not in `known` (a set of path strings)."""
    for path in sorted(layout.studies.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = read_header(path)
        except PermanentError as exc:  # a file we wrote cannot be read: keep it, report it
            log.error("spool file left in place: %s", exc)
            continue
        yield ArrivedInstance(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            path=path,
            received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
        )
