"""Watching one source: every interval a search (QIDO-RS or C-FIND), each new study pulled once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date

from agent.db.database import Database
from agent.db.sources import FAILED, KNOWN, PULLED, SeenStudies
from agent.errors import AgentError
from agent.logs import log_context, study_key
from agent.periodic import Periodic
from agent.pull.puller import Puller
from agent.pull.source import FoundStudy, SourceUnavailable, StudySource
from agent.settings import SourcePoll

log = logging.getLogger(__name__)

# A failed pull is due again after the poll interval, doubling up to this (or the interval).
MAX_BACKOFF_SECONDS = 3600.0
_UNSEEN = object()


class Poller:
    """Finds a source's new studies and pulls each once; what it has seen is in the database.

    The first search of a source sets its baseline: the studies already there are remembered,
    not pulled (unless `backfill`). A study is pulled once two searches in a row found it with
    the same number of instances, so that one still being stored in the archive is not taken
    half. One the agent already holds (pushed to it, or submitted) is not pulled again. A pull
    that fails is retried at later polls with a doubling backoff, and not marked seen.
    """

    def __init__(
        self,
        source: StudySource,
        poll: SourcePoll,
        puller: Puller,
        db: Database,
        *,
        today: Callable[[], date] = date.today,
    ) -> None:
        self._source = source
        self._poll = poll
        self._puller = puller
        self._db = db
        self._seen = SeenStudies(db)
        self._today = today
        # Instances each due study had at the previous search (it must hold still once).
        self._previous: dict[str, int | None] = {}
        self._loop = Periodic(
            f"poll of {self._source.name}", self.poll_once, self._poll.interval_seconds
        )
        self._stop = self._loop.stopping

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def poll_once(self) -> int:
        """One search, and the pulls it calls for; returns how many studies were pulled."""
        name = self._source.name
        try:
            found = self._source.search(self._poll, self._today())
        except AgentError as exc:
            log.warning("search at %s failed: %s", name, exc)
            return 0
        if not self._seen.watched(name):
            baseline = [] if self._poll.backfill else [f.study_uid for f in found]
            self._seen.begin_watch(name, baseline)
            log.info(
                "watching %s: %d studies already there are %s",
                name,
                len(found),
                "pulled as they hold still" if self._poll.backfill else "not pulled",
            )
            if not self._poll.backfill:
                return 0
        due = set(self._seen.due(name, [f.study_uid for f in found]))
        ready = [f for f in found if f.study_uid in due and self._holds_still(f)]
        self._previous = {f.study_uid: f.instances for f in found if f.study_uid in due}
        pulled = 0
        for study in ready:
            if self._stop.is_set():
                break
            outcome = self._pull(study)
            self._previous.pop(study.study_uid, None)
            if outcome == PULLED:
                pulled += 1
            elif outcome == "unavailable":
                break  # the rest wait for the next poll rather than fail one by one
        return pulled

    def _holds_still(self, study: FoundStudy) -> bool:
        return self._previous.get(study.study_uid, _UNSEEN) == study.instances

    def _pull(self, study: FoundStudy) -> str:
        name = self._source.name
        with log_context(study=study_key(study.study_uid)):
            if self._db.get(study.study_uid) is not None:
                self._seen.settle(name, study.study_uid, KNOWN)
                log.info("%s lists a study already here; not pulled", name)
                return KNOWN
            try:
                self._puller.pull(self._source, study.study_uid, self._stop.is_set)
            except AgentError as exc:
                backoff = self._poll.interval_seconds
                attempts, delay = self._seen.failed(
                    name,
                    study.study_uid,
                    str(exc),
                    backoff=backoff,
                    backoff_max=max(backoff, MAX_BACKOFF_SECONDS),
                )
                log.warning(
                    "pull from %s failed (attempt %d, again in %.0f s): %s",
                    name,
                    attempts,
                    delay,
                    exc,
                )
                return "unavailable" if isinstance(exc, SourceUnavailable) else FAILED
            self._seen.settle(name, study.study_uid, PULLED)
            return PULLED
