"""Frozen values that cross the study database's boundary: arrivals in, status lines out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.db.states import State


@dataclass(frozen=True)
class StudyStatus:
    """One line of `pacs-agent status`: no patient identity, only the study key."""

    study_key: str
    state: State
    reason: str
    instance_count: int
    stages: tuple[tuple[State, datetime], ...]


@dataclass(frozen=True)
class ArrivedInstance:
    """An instance durably in the spool, as the receiver (or the start-up scan) reports it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    received_at: datetime
    # SHA-256 of the dataset after its file meta group (agent.spool.digest): a re-send with
    # other content under the same SOP Instance UID is a different input. Empty: not known.
    digest: str = ""
    # agent.logs.accession_digest of its AccessionNumber; "" for none.
    accession_hash: str = ""


@dataclass(frozen=True)
class Interruption:
    """A sender's delivery of a study cut short: its association (or STOW-RS request) aborted
    or dropped, or an instance of it refused for a reason that passes (out of resources). The
    sender is expected to send again, so the study waits for that before it is sealed."""

    study_uid: str
    at: datetime
    what: str


@dataclass(frozen=True)
class CleanSend:
    """An association that began at `began`, stored instances of a study, refused none and
    ended with a release (or a STOW-RS request answered so): a re-send after an interruption
    before `began` makes up for it."""

    study_uid: str
    began: datetime


# What the receiver tells the assembler, in the order it happened.
SenderNews = ArrivedInstance | Interruption | CleanSend
