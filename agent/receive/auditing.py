"""The receiver's audit records: who associated, and what each association stored, per study.

Instances are counted while an association runs and written as one `instances-received` line
when it ends, so that a 2,000-slice study costs one line, not 2,000.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from agent import audit
from agent.logs import study_key


def peers(assoc: Association) -> tuple[audit.Peer, audit.Peer]:
    """The calling side (AE title, address, port) and the called side (AE title) of a request."""
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip() if primitive else None
    called = str(primitive.called_ae_title).strip() if primitive else None
    source = audit.Peer(calling, str(assoc.requestor.address), assoc.requestor.port)
    return source, audit.Peer(called)


def record_rejection(assoc: Association, result: int, source: int, reason: int, why: str) -> None:
    """Audit an association this receiver rejected, with what failed and the A-ASSOCIATE-RJ."""
    calling, called = peers(assoc)
    audit.association(
        False, source=calling, destination=called, reason=why, rejection=(result, source, reason)
    )


@dataclass
class _Tally:
    stored: int = 0
    refused: int = 0


@dataclass
class _Open:
    source: audit.Peer
    destination: audit.Peer
    studies: dict[str | None, _Tally] = field(default_factory=dict)


class AssociationAudit:
    """Event handlers that audit associations; `instance` is told each C-STORE's result.

    Accepted associations are recorded by EVT_ACCEPTED; rejections by this receiver's own
    handlers through `record_rejection`, and pynetdicom's own (too many associations) by
    EVT_REJECTED. An association's instances are written when it is released or aborted, or,
    failing both, when its connection closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Association, _Open] = {}

    def handlers(self) -> list[evt.EventHandlerType]:
        """The (event, handler) pairs to register on the listener."""
        return [
            (evt.EVT_ACCEPTED, self.accepted),
            (evt.EVT_REJECTED, self.rejected),
            (evt.EVT_RELEASED, self.ended),
            (evt.EVT_ABORTED, self.ended),
            (evt.EVT_CONN_CLOSE, self.ended),
        ]

    def accepted(self, event: Event) -> None:
        source, destination = peers(event.assoc)
        with self._lock:
            self._open[event.assoc] = _Open(source, destination)
        audit.association(True, source=source, destination=destination)

    def rejected(self, event: Event) -> None:
        """pynetdicom's own rejection (PS3.8 Table 9-21 local-limit-exceeded, over
        max_associations); ours are recorded where they are sent."""
        primitive = event.assoc.acceptor.primitive
        if primitive is None:
            return
        result = int(primitive.result or 0)
        source = int(primitive.result_source or 0)
        reason = int(primitive.diagnostic or 0)
        why = audit.describe_rejection(result, source, reason)
        record_rejection(event.assoc, result, source, reason, why)

    def instance(self, assoc: Association, study_uid: str | None, stored: bool) -> None:
        """One C-STORE answered: `stored`, or refused; `study_uid` None when it was not read."""
        key = study_key(study_uid) if study_uid else None
        with self._lock:
            entry = self._open.get(assoc)
            if entry is None:
                return
            tally = entry.studies.setdefault(key, _Tally())
            if stored:
                tally.stored += 1
            else:
                tally.refused += 1

    def ended(self, event: Event) -> None:
        with self._lock:
            entry = self._open.pop(event.assoc, None)
        if entry is None or not entry.studies:  # already written, or nothing was sent
            return
        assoc = event.assoc
        # An A-ABORT (or a dropped connection) closes the transport in the DUL thread before
        # the association's own thread reports EVT_ABORTED: the indication is still queued.
        if event.event is evt.EVT_RELEASED or assoc.is_released:
            how = "released"
        elif event.event is evt.EVT_ABORTED or assoc.is_aborted or assoc.acse.is_aborted():
            how = "aborted"
        else:
            how = "closed"
        audit.instances_received(
            source=entry.source,
            destination=entry.destination,
            studies=[
                audit.StudyCount(key, tally.stored, tally.refused)
                for key, tally in entry.studies.items()
            ],
            ended=how,
        )
