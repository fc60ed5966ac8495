"""What one STOW-RS request tells the assembler of its sender's delivery, per study.

A STOW-RS request plays the part an association plays for C-STORE (see
agent.receive.auditing): a request cut off on its way (the client gone, its body stalled past
the body timeout, a multipart body without its end), failed whole for want of room, or with
instances refused for a reason that passes, leaves the studies it carried interrupted, and
the sender is expected to send again. A request answered in full with no such refusal is a
clean send of each study it stored instances of, which makes up for an earlier interruption.
A refusal that a re-send would meet again (an unreadable dataset, an instance of another study
than the request's path names) is no interruption: waiting for it would only delay the study.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.db.values import CleanSend, Interruption
from agent.dicom.uids import is_valid_uid
from agent.receive.auditing import sent_again
from agent.web.stow_response import PROCESSING_FAILURE, Result


def refused_for_now(status: int) -> bool:
    """Whether a part refused with this failure reason is one the sender will send again:
    out of resources (A7xx, PS3.4 Table B.2-1, which PS3.18 I.2.2 shares), or an error of this
    receiver's own (0110 here, C0FF as C-STORE answers it)."""
    return sent_again(status) or status == PROCESSING_FAILURE


@dataclass
class _Tally:
    stored: int = 0
    to_resend: int = 0


def sender_news(
    results: Iterable[Result],
    *,
    began: datetime,
    cut: str | None = None,
    study: str | None = None,
) -> list[Interruption | CleanSend]:
    """Per study the request carried: interrupted, or delivered cleanly.

    `results` are the parts checked (or, for a request answered, stored); `cut` says how the
    request broke off before it could be answered (None when it was answered); `study` is the
    Study Instance UID its path names, if any: carried even where no part of it was read. A
    part refused before its study was read, for a reason that passes, counts against every
    study of the request, as it may have been any of them. A request to no study path whose
    parts name no study tells nothing: there is no study to hold.
    """
    tallies: dict[str | None, _Tally] = {}
    if study is not None and is_valid_uid(study):
        tallies[study] = _Tally()
    for result in results:
        uid = result.study_uid if is_valid_uid(result.study_uid) else None
        if result.stored:
            tallies.setdefault(uid, _Tally()).stored += 1
        elif refused_for_now(result.status):
            tallies.setdefault(uid, _Tally()).to_resend += 1
        # Refused for good: the study is not held for it (nor counted as delivered).
    now = datetime.now(UTC)
    unread = tallies[None].to_resend if None in tallies else 0
    news: list[Interruption | CleanSend] = []
    for uid, tally in tallies.items():
        if uid is None:
            continue
        if cut is not None:
            received = tally.stored + tally.to_resend
            what = f"STOW-RS request {cut}"
            if received:
                what += f" after {received} instances, none stored"
            news.append(Interruption(uid, now, what))
        elif tally.to_resend + unread:
            what = f"STOW-RS: {tally.to_resend + unread} instances refused for resources"
            news.append(Interruption(uid, now, what))
        elif tally.stored:
            news.append(CleanSend(uid, began))
    return news
