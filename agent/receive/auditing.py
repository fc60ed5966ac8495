"""What each association did, per study: the audit trail's records, and the assembler's news.

Instances are counted while an association runs and written as one `instances-received` line
when it ends, so that a 2,000-slice study costs one line, not 2,000. The assembler is told, per
study, whether the association delivered cleanly or was cut short (aborted, dropped, instances
refused for want of resources), so that a study the sender must send again is not sealed on
the part that came.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from agent import audit
from agent.db.values import CleanSend, Interruption
from agent.logs import study_key

# The C-STORE statuses after which the sender is expected to send the instance again: Refused:
# Out of Resources (A7xx, PS3.4 Table B.2-1), and the failure this receiver sends for an
# unexpected error of its own (C0FF). A dataset refused as unreadable or conflicting would be
# refused again; waiting for it would only delay the rest of the study.
OUT_OF_RESOURCES = range(0xA700, 0xA800)
INTERNAL_ERROR = 0xC0FF

SenderReport = Callable[[Interruption | CleanSend], None]


def sent_again(status: int) -> bool:
    """Whether a C-STORE failure with this status is one the sender will retry."""
    return status in OUT_OF_RESOURCES or status == INTERNAL_ERROR


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
    # Refused with a status the sender retries (see `sent_again`).
    to_resend: int = 0


@dataclass
class _Open:
    source: audit.Peer
    destination: audit.Peer
    began: datetime
    # By Study Instance UID; None for instances refused before their study could be read.
    studies: dict[str | None, _Tally] = field(default_factory=dict)


class AssociationAudit:
    """Event handlers that audit associations; `instance` is told each C-STORE's result.

    Accepted associations are recorded by EVT_ACCEPTED; rejections by this receiver's own
    handlers through `record_rejection`, and pynetdicom's own (too many associations) by
    EVT_REJECTED. An association's instances are written when it is released or aborted, or,
    failing both, when its connection closes; `report`, when given, is then told per study
    whether the association delivered it cleanly.
    """

    def __init__(self, report: SenderReport | None = None) -> None:
        self._report = report
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
            self._open[event.assoc] = _Open(source, destination, datetime.now(UTC))
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

    def instance(self, assoc: Association, study_uid: str | None, status: int) -> None:
        """One C-STORE answered with `status`; `study_uid` None when it was not read."""
        with self._lock:
            entry = self._open.get(assoc)
            if entry is None:
                return
            tally = entry.studies.setdefault(study_uid or None, _Tally())
            if status == 0:
                tally.stored += 1
            else:
                tally.refused += 1
                tally.to_resend += sent_again(status)

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
                audit.StudyCount(study_key(uid) if uid else None, tally.stored, tally.refused)
                for uid, tally in entry.studies.items()
            ],
            ended=how,
        )
        if self._report is not None:
            for news in _sender_news(entry, how):
                self._report(news)


def _sender_news(entry: _Open, how: str) -> list[Interruption | CleanSend]:
    """Per study the association touched: interrupted (and how), or delivered cleanly.

    An instance refused before its study was read counts against every study of the
    association: it may have been any of them.
    """
    now = datetime.now(UTC)
    unread = entry.studies.get(None, _Tally()).to_resend
    news: list[Interruption | CleanSend] = []
    for uid, tally in entry.studies.items():
        if uid is None:
            continue
        to_resend = tally.to_resend + unread
        if how != "released":
            cut = "association aborted" if how == "aborted" else "connection lost"
            news.append(Interruption(uid, now, f"{cut} after {tally.stored} instances"))
        elif to_resend:
            news.append(Interruption(uid, now, f"{to_resend} instances refused for resources"))
        else:
            news.append(CleanSend(uid, entry.began))
    return news
