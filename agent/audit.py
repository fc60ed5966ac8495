"""The audit trail: one JSON line per security-relevant event, in a log file of its own.

In the spirit of IHE ATNA and DICOM PS3.15 A.5: each line says what happened (`event`, with the
DICOM audit event ID and type code), what it did to data (`action`), how it ended (`outcome`),
who was involved (`source`, `destination`: AE titles and network addresses) and which study
(its key from `agent.logs.study_key`). Like every other log line, it never carries patient
identity, and never a value from the configuration file, which may hold secrets.

The CLI opens the trail once (`configure_audit`) for the roles that run the service. Until
then every function here is a cheap no-op, and none of them ever raises into its caller: the
audit trail records what the service does and must not be what makes it fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.db.deliveries import is_stored
from agent.domain import Code
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.settings import Settings

log = logging.getLogger(__name__)

AUDIT_LOGGER = "pacs_agent.audit"


class Action(StrEnum):
    """EventActionCode (PS3.15 A.5.1, RFC 3881): what the event did to the data."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # refused or partly done; the peer may try again
    SERIOUS_FAILURE = 8  # the action was ended, nothing of it done
    MAJOR_FAILURE = 12  # the function was made unavailable


# Audit Event IDs, PS3.16 CID 400, and Audit Event Type Codes, CID 401 (scheme DCM, Annex D).
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")


@dataclass(frozen=True)
class Peer:
    """One side of a DICOM exchange: its AE title and where it is on the network."""

    ae_title: str | None = None
    address: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class StudyCount:
    """What one association did for one study: instances stored and instances refused.

    `study` is the study key; None for refused instances whose study could not be read.
    """

    study: str | None
    stored: int = 0
    refused: int = 0


# PS3.8 Table 9-21: the result, source and reason (diagnostic) of an A-ASSOCIATE-RJ.
_RJ_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_REASONS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def describe_rejection(result: int, source: int, diagnostic: int) -> str:
    """An A-ASSOCIATE-RJ in the words of PS3.8 Table 9-21, e.g. for pynetdicom's own ones."""
    verdict = _RJ_RESULTS.get(result, f"result {result}")
    reason = _RJ_REASONS.get((source, diagnostic), f"source {source} reason {diagnostic}")
    return f"{verdict}: {reason}"


class _AuditFormatter(logging.Formatter):
    """One JSON object per line: the time first, then the event's fields as given."""

    def __init__(self) -> None:
        super().__init__()
        self._host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "audit", None) or {"event": record.getMessage()}
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry = {
            "time": at.replace("+00:00", "Z"),
            **fields,
            "host": self._host,
            "pid": record.process,
        }
        # Not ASCII-escaped: whoever greps the file for a name finds it if it is there.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_audit(settings: Settings) -> Path | None:
    """Open the audit log that `[logging] audit_file` names; None when it is turned off.

    Called once, by the CLI. A WatchedFileHandler reopens the file after logrotate moves it.
    The file is made readable by its owner and group only: it names peers and studies.

    Raises ConfigError when the file cannot be opened: a service that should keep an audit
    trail does not run without one.
    """
    logger = logging.getLogger(AUDIT_LOGGER)
    close_audit()
    path = settings.audit_path
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"[logging] audit_file {path}: cannot open: {exc.strerror}") from None
    handler.setFormatter(_AuditFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Only the audit file gets these lines; the service's own log stays as it is.
    logger.propagate = False
    return path


def close_audit() -> None:
    """Close the audit log; later events are no-ops until `configure_audit` is called again."""
    logger = logging.getLogger(AUDIT_LOGGER)
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
        handler.close()


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes, in hex; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _emit(
    event: str,
    event_id: Code,
    action: Action,
    outcome: Outcome,
    *,
    event_type: Code | None = None,
    **fields: Any,
) -> None:
    logger = logging.getLogger(AUDIT_LOGGER)
    if not logger.handlers:
        return
    entry: dict[str, Any] = {
        "event": event,
        "event_id": _coded(event_id),
        **({"event_type": _coded(event_type)} if event_type is not None else {}),
        "action": action.value,
        "outcome": int(outcome),
        **{key: value for key, value in fields.items() if value is not None},
    }
    # Formatting and writing happen in the handler, where logging reports a failure (a full
    # disk, an unserialisable value) on stderr instead of raising: an audit record never fails
    # the action it records.
    logger.info(event, extra={"audit": entry})


def _coded(code: Code) -> dict[str, str]:
    return {"code": code.value, "meaning": code.meaning, "scheme": code.scheme}


def _outcome(done: int, failed: int) -> Outcome:
    """Success when nothing failed, minor failure when some did, serious failure when all did."""
    if not failed:
        return Outcome.SUCCESS
    return Outcome.MINOR_FAILURE if done else Outcome.SERIOUS_FAILURE


def _peer(peer: Peer | None) -> dict[str, Any] | None:
    if peer is None:
        return None
    return {key: value for key, value in asdict(peer).items() if value is not None}


def _status_counts(statuses: Mapping[int, int]) -> dict[str, int]:
    return {f"0x{status:04X}": count for status, count in sorted(statuses.items())}


def association(
    accepted: bool,
    *,
    source: Peer,
    destination: Peer,
    reason: str | None = None,
    rejection: tuple[int, int, int] | None = None,
) -> None:
    """An association request answered: accepted, or rejected with `reason` and the A-ASSOCIATE-RJ
    (result, source, reason of PS3.8 Table 9-21) in `rejection`.

    An accepted association is a successful authentication of the calling node by its AE title
    and address (User Authentication, Login); a rejected one is a Security Alert (Node
    Authentication, minor failure: refused, nothing admitted), as dcm4chee records it too.
    """
    if accepted:
        _emit(
            "association-accepted",
            USER_AUTHENTICATION,
            Action.EXECUTE,
            Outcome.SUCCESS,
            event_type=LOGIN,
            source=_peer(source),
            destination=_peer(destination),
        )
        return
    detail = None
    if rejection is not None:
        detail = {
            "result": rejection[0],
            "source": rejection[1],
            "reason": rejection[2],
            "meaning": describe_rejection(*rejection),
        }
    _emit(
        "association-rejected",
        SECURITY_ALERT,
        Action.EXECUTE,
        Outcome.MINOR_FAILURE,
        event_type=NODE_AUTHENTICATION,
        source=_peer(source),
        destination=_peer(destination),
        reason=reason,
        rejection=detail,
    )


def instances_received(
    *,
    source: Peer,
    destination: Peer,
    studies: Sequence[StudyCount],
    ended: str,
    user: str | None = None,
) -> None:
    """What one association stored, per study, written once when it ends (`ended`: released,
    aborted or closed): one line per association, however many instances it carried. A STOW-RS
    request is written the same way, `ended` its HTTP status and `user` who it was admitted as.

    PS3.15 A.5.3.5 DICOM Instances Transferred, action Create. Success when nothing was refused,
    minor failure when some instances were, serious failure when every one was.
    """
    stored = sum(study.stored for study in studies)
    refused = sum(study.refused for study in studies)
    _emit(
        "instances-received",
        INSTANCES_TRANSFERRED,
        Action.CREATE,
        _outcome(stored, refused),
        source=_peer(source),
        destination=_peer(destination),
        ended=ended,
        user=user,
        stored=stored,
        refused=refused,
        studies=[asdict(study) for study in studies],
    )


def objects_exported(
    destination: str,
    study: str,
    count: int,
    statuses: Mapping[int, int],
    *,
    peer: Peer | None = None,
    objects: Sequence[str] = (),
) -> None:
    """Objects of one study sent to a configured destination (by its name).

    `study` is the study key; `count` the objects offered; `statuses` how many of them got each
    DICOM status (PS3.4 B.2.3; a STOW-RS response carries the same codes); an object with no
    status at all (the association failed first) counts as failed. `peer` is the destination's
    AE title and address, and `objects` what was sent (e.g. "SEG", "SR").

    PS3.15 A.5.3.5 DICOM Instances Transferred, action Read (the sender's side): success when
    every object was stored, minor failure when some were, serious failure when none was.
    """
    succeeded = sum(n for status, n in statuses.items() if is_stored(status))
    failed = max(count - succeeded, 0)
    target = {"name": destination, **(_peer(peer) or {})}
    _emit(
        "objects-exported",
        INSTANCES_TRANSFERRED,
        Action.READ,
        _outcome(succeeded, failed),
        destination=target,
        study=study,
        count=count,
        failed=failed,
        statuses=_status_counts(statuses),
        objects=list(objects) or None,
    )


def config_loaded(path: Path | None, digest: str | None, *, role: str) -> None:
    """The configuration a process started with: its path and SHA-256, never its contents.

    PS3.15 A.5.3.1 Application Activity, Application Start. `path` None: the built-in defaults.
    """
    config = {"path": str(path) if path is not None else None, "sha256": digest}
    _emit(
        "config-loaded",
        APPLICATION_ACTIVITY,
        Action.EXECUTE,
        Outcome.SUCCESS,
        event_type=APPLICATION_START,
        role=role,
        config=config,
    )


def application_stopped(role: str, *, ok: bool, reason: str | None = None) -> None:
    """A process of the service stopped; `ok` False when it stopped on an error (`reason`)."""
    _emit(
        "application-stopped",
        APPLICATION_ACTIVITY,
        Action.EXECUTE,
        Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE,
        event_type=APPLICATION_STOP,
        role=role,
        reason=reason,
    )


def model_switched(model: str, *, state: str, configured: str, by: str | None) -> None:
    """A model switched on, paused or off at run time, or (state "reset") back to its
    configured state: a Security Alert, Software Configuration (PS3.15 A.5.3.11), since it
    changes what the service does with every study; `by` is the operating-system user."""
    _emit(
        "model-switched",
        SECURITY_ALERT,
        Action.EXECUTE,
        Outcome.SUCCESS,
        event_type=SOFTWARE_CONFIGURATION,
        model=model,
        state=state,
        configured=configured,
        user=by,
    )


def study_purged(study: str, *, state: str, files: int) -> None:
    """A finished study's spooled files deleted by retention (PS3.15 A.5.3.6 Study Deleted)."""
    _emit(
        "study-purged",
        STUDY_DELETED,
        Action.DELETE,
        Outcome.SUCCESS,
        study=study,
        state=state,
        files=files,
    )


def tls_refused(source: Peer, detail: str) -> None:
    """A TLS handshake on the listener failed: a Security Alert, Node Authentication."""
    _emit(
        "tls-refused",
        SECURITY_ALERT,
        Action.EXECUTE,
        Outcome.MINOR_FAILURE,
        event_type=NODE_AUTHENTICATION,
        source=_peer(source),
        reason=detail,
    )


def login_refused(source: Peer, reason: str) -> None:
    """An HTTP request refused for missing or wrong credentials (PS3.15 A.5.3.11 User
    Authentication, Login, minor failure); `reason` never holds the credentials tried."""
    _emit(
        "login-refused",
        USER_AUTHENTICATION,
        Action.EXECUTE,
        Outcome.MINOR_FAILURE,
        event_type=LOGIN,
        source=_peer(source),
        reason=reason,
    )
