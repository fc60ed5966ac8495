"""Admitting a checked instance: put at its place in the spool, then announced to the assembler.

The last step of every door, C-STORE, STOW-RS and a pull: each has its own way of getting the
bytes to disk (one write of a dataset held in memory, or the rename of a part already streamed
to tmp), and all then tell the same sink, so that an instance is the same arrival whichever
way it came. An instance whose SOP Instance UID is stored in another series of its study is
not admitted: one UID names one object (PS3.5 9), and taking the second copy would switch the
study's input from one series to the other.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from agent.db.values import ArrivedInstance
from agent.logs import accession_digest, log_context, study_key
from agent.spool.digest import dataset_digest
from agent.spool.layout import SpoolLayout

log = logging.getLogger(__name__)

IN_ANOTHER_SERIES = "SOP Instance already stored in another series of this study"


class Refusal(enum.Enum):
    """Why an instance was not admitted; each door answers it with its own status."""

    # The spool could not be written (disk full, spool gone): the sender is to send again.
    OUT_OF_RESOURCES = "out of resources"
    # The SOP Instance UID is stored in another series of the study: a conflict, for good.
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class NotAdmitted:
    """An instance refused by `admit`: the kind of refusal and its words (no identifiers)."""

    refusal: Refusal
    reason: str


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
    @property
    def accession_number(self) -> str: ...


def stored_elsewhere(layout: SpoolLayout, ids: InstanceIds) -> Path | None:
    """The spool file of the same SOP Instance in another series of its study, if any.

    Looked for on disk, not in the database: it holds before the assembler has recorded an
    arrival, and across restarts. A study has a few series folders; one stat each.
    """
    study = layout.study_dir(ids.study_uid)
    own = layout.series_folder(ids.series_uid)
    try:
        folders = [f for f in study.iterdir() if f.name != own]
    except FileNotFoundError:
        return None
    for folder in folders:
        path = folder / f"{ids.sop_uid}.dcm"
        if path.exists():
            return path
    return None


def admit(
    layout: SpoolLayout,
    ids: InstanceIds,
    place: Callable[[Path], object],
    sink: Callable[[ArrivedInstance], None],
    digest: str | None = None,
) -> NotAdmitted | None:
    """Have `place` put the instance durably at its spool path, then hand it to `sink`.

    Returns None once the instance is on disk and announced, or why it was not stored: the
    same SOP Instance is stored in another series of the study (nothing is placed), or
    `place` failed with an OSError (disk full, spool gone). The caller must not acknowledge
    the instance before this returns None. A failing `sink` is not caught: the instance is
    then on disk but not announced, which the caller's boundary answers as an error, and the
    spool scan at start finds it. `digest` is the content digest (agent.spool.digest) when
    the caller has it already; else the placed file is read for it.
    """
    path = layout.instance_path(ids.study_uid, ids.series_uid, ids.sop_uid)
    with log_context(study=study_key(ids.study_uid)):
        if stored_elsewhere(layout, ids) is not None:
            log.warning("refused an instance: %s", IN_ANOTHER_SERIES)
            return NotAdmitted(Refusal.DUPLICATE, IN_ANOTHER_SERIES)
        try:
            place(path)
            if digest is None:
                digest = dataset_digest(path)
        except OSError as exc:
            log.error("spool write failed: %s", exc.strerror)
            return NotAdmitted(Refusal.OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")
        sink(
            ArrivedInstance(
                study_uid=ids.study_uid,
                series_uid=ids.series_uid,
                sop_uid=ids.sop_uid,
                sop_class_uid=ids.sop_class_uid,
                path=path,
                received_at=datetime.now(UTC),
                digest=digest,
                accession_hash=accession_digest(ids.accession_number),
            )
        )
    return None
