"""Start-up scan: instances on disk the database does not know (acknowledged before a crash)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from agent.db.values import ArrivedInstance
from agent.dicom.files import DEFAULT_MAX_BYTES, read_header
from agent.dicom.inflate import InflatedTooLarge
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


def unknown_instances(
    layout: SpoolLayout, known: set[str], max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[ArrivedInstance]:
    """Instances in the spool that are not in `known` (a set of path strings).

    A file that cannot be read is left in place and reported, never read whole: a deflated
    dataset that inflates past `max_bytes` (the receiver's limit; an older version did not
    check it) is counted while inflated, not kept, so that no stored file can stop a start.
    """
    for path in sorted(layout.studies.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = read_header(path, max_bytes=max_bytes)
        except InflatedTooLarge as exc:
            log.warning("spool file left in place, not processed: %s", exc)
            continue
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
