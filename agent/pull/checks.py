"""The checks a retrieved instance passes before the spool takes it, as a C-STORE dataset does."""

from __future__ import annotations

from pydicom.uid import UID

from agent.errors import PermanentError
from agent.receive.handlers import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, MISSING_UIDS
from agent.receive.identify import Identifiers, Unreadable, identify, missing_uids


class Refused(PermanentError):
    """The instance is not taken: `status` is its C-STORE status (PS3.4 Table B.2-1)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def checked(raw: bytes, syntax: UID, sop_class_uid: str | None, sop_uid: str | None) -> Identifiers:
    """The UIDs of the dataset `raw`, which must be of the SOP Class and Instance named by its
    C-STORE request (PS3.4 B.2.3) or its file meta group (PS3.10 7.1); raises Refused."""
    try:
        ids = identify(raw, syntax)
    except Unreadable as exc:
        raise Refused(CANNOT_UNDERSTAND, str(exc)) from None
    missing = missing_uids(ids)
    if missing:
        raise Refused(MISSING_UIDS, "missing or invalid " + ", ".join(missing))
    if (ids.sop_class_uid, ids.sop_uid) != (sop_class_uid, sop_uid):
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, "it is not the instance its header names")
    return ids
