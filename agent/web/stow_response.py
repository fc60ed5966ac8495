"""What a STOW-RS request's parts came to: a `Result` each, and their PS3.18 Annex I answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.receive.handlers import SUCCESS

# PS3.18 I.2.2 (PS3.7 C.4): the failure reason for an error of this receiver's own.
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Result:
    """One part's outcome: SUCCESS or a PS3.18 I.2.2 failure reason, and what it was."""

    status: int
    sop_class_uid: str = ""
    sop_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    reason: str = ""
    spooled: Path | None = None  # the synced temp file of an instance to be stored
    accession_number: str = ""  # never answered nor logged: the study's lookup digest

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def response_body(results: Iterable[Result]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) in the DICOM JSON model (F.2).

    No Retrieve URL is given (Type 2, so present and empty): this agent keeps instances only
    until they are processed and offers no WADO-RS.
    """
    failed: list[dict[str, Any]] = []
    stored: list[dict[str, Any]] = []
    for result in results:
        item = {
            "00081150": _ui(result.sop_class_uid),
            "00081155": _ui(result.sop_uid),
        }
        if result.stored:
            stored.append({**item, "00081190": {"vr": "UR"}})
        else:
            failed.append({**item, "00081197": {"vr": "US", "Value": [result.status]}})
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    return body
