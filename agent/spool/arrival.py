"""Admitting a checked instance: put at its place in the spool, then announced to the assembler.

The last step of both doors, C-STORE and STOW-RS: each has its own way of getting the bytes to
disk (one write of a dataset held in memory, or the rename of a part already streamed to tmp),
and both then tell the same sink, so that an instance is the same arrival whichever way it came.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from agent.db.values import ArrivedInstance
from agent.logs import log_context, study_key
from agent.spool.layout import SpoolLayout

log = logging.getLogger(__name__)


class InstanceIds(Protocol):
    """The UIDs that place an instance in the spool and name it to the assembler."""

    @property
    def sop_class_uid(self) -> str: ...
    @property
    def sop_uid(self) -> str: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...


def admit(
    layout: SpoolLayout,
    ids: InstanceIds,
    place: Callable[[Path], object],
    sink: Callable[[ArrivedInstance], None],
) -> str | None:
    """Have `place` put the instance durably at its spool path, then hand it to `sink`.

    Returns None once the instance is on disk and announced, or, when `place` fails with an
    OSError (disk full, spool gone), why it was not stored: the caller's Out of Resources. The
    caller must not acknowledge the instance before this returns None. A failing `sink` is not
    caught: the instance is then on disk but not announced, which the caller's boundary
    answers as an error, and the spool scan at start finds it.
    """
    path = layout.instance_path(ids.study_uid, ids.series_uid, ids.sop_uid)
    with log_context(study=study_key(ids.study_uid)):
        try:
            place(path)
        except OSError as exc:
            log.error("spool write failed: %s", exc.strerror)
            return f"spool write failed: {exc.strerror}"
        sink(
            ArrivedInstance(
                study_uid=ids.study_uid,
                series_uid=ids.series_uid,
                sop_uid=ids.sop_uid,
                sop_class_uid=ids.sop_class_uid,
                path=path,
                received_at=datetime.now(UTC),
            )
        )
    return None
