"""Start-up scan: instances on disk the database does not know (acknowledged before a crash)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from agent.db.values import ArrivedInstance
from agent.dicom.files import DEFAULT_MAX_BYTES, read_header
from agent.dicom.inflate import InflatedTooLarge
from agent.errors import PermanentError
from agent.logs import accession_digest, instance_key
from agent.spool.arrival import IN_ANOTHER_SERIES
from agent.spool.digest import dataset_digest
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
    A second copy of an instance in another series folder of its study (which an older
    version stored) is left in place and reported too: the recorded copy is kept, or, when
    none is, the oldest, so that no start switches the study's input to the other series.
    """
    for path in _first_copies(layout, known):
        if str(path) in known:
            continue
        try:
            ds = read_header(path, max_bytes=max_bytes)
            digest = dataset_digest(path)
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
            digest=digest,
            accession_hash=accession_digest(str(ds.get("AccessionNumber") or "")),
        )


def _first_copies(layout: SpoolLayout, known: set[str]) -> list[Path]:
    """The spool's instance files, one per instance of a study: of several copies in different
    series folders, the recorded one, else the oldest; each other copy is reported."""
    copies: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(layout.studies.glob("*/*/*.dcm")):
        copies.setdefault((path.parent.parent.name, path.name), []).append(path)
    kept: list[Path] = []
    for paths in copies.values():
        keep = paths[0]
        if len(paths) > 1:
            recorded = [p for p in paths if str(p) in known]
            keep = recorded[0] if recorded else min(paths, key=_age)
            for other in paths:
                if other != keep:
                    log.warning(
                        "spool file left in place, not processed: %s: %s",
                        instance_key(other),
                        IN_ANOTHER_SERIES,
                    )
        kept.append(keep)
    return sorted(kept)


def _age(path: Path) -> tuple[int, str]:
    try:
        return path.stat().st_mtime_ns, str(path)
    except OSError:
        return 2**63, str(path)
