"""The configured sources of one process: pulls on request, pollers, and count checks."""

from __future__ import annotations

import logging
import threading

from agent.db.database import Database
from agent.dicom.uids import is_valid_uid
from agent.errors import AgentError, ConfigError, PermanentError
from agent.logs import log_context, study_key
from agent.pull.poller import Poller
from agent.pull.puller import Puller, PullResult
from agent.pull.source import DicomWebSource, StudyNotFound, StudySource
from agent.pull.verify import CountsBySender
from agent.settings import Settings, SourceSettings
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark

log = logging.getLogger(__name__)

# The count check runs on the assembler's thread: an archive slower than this is not waited for.
COUNT_TIMEOUT_SECONDS = 5.0


def source_for(
    settings: SourceSettings,
    calling_ae: str,
    *,
    timeout: float | None = None,
    max_instance_bytes: int | None = None,
) -> StudySource:
    """The source a [[sources]] entry describes; `calling_ae` is our AE title to a DICOM peer."""
    if settings.kind == "dimse":
        from agent.pull.dimse import DimseSource

        return DimseSource(
            settings, calling_ae, timeout=timeout, max_instance_bytes=max_instance_bytes
        )
    return DicomWebSource(settings, timeout=timeout)


class InvalidStudyUid(PermanentError):
    """What was given as a StudyInstanceUID is not a UID (PS3.5 9.1)."""


class Pulls:
    """Every [[sources]] entry, as pulls, pollers and count checks for this process."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        layout: SpoolLayout,
        *,
        sources: dict[str, StudySource] | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self.sources: dict[str, StudySource] = (
            sources
            if sources is not None
            else {
                s.name: source_for(
                    s,
                    settings.receiver.ae_title,
                    max_instance_bytes=settings.receiver.max_instance_bytes,
                )
                for s in settings.sources
            }
        )
        self.puller = Puller(
            db,
            layout,
            max_instance_bytes=settings.receiver.max_instance_bytes,
            watermark=Watermark.from_settings(settings.spool),
        )
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def source(self, name: str | None) -> StudySource:
        """The source named `name`; without a name, the only one configured."""
        if not self.sources:
            raise ConfigError("no [[sources]] configured to pull from")
        known = ", ".join(self.sources)
        if name is None:
            if len(self.sources) == 1:
                return next(iter(self.sources.values()))
            raise ConfigError(f"name the source to pull from (known: {known})")
        source = self.sources.get(name)
        if source is None:
            raise ConfigError(f"no source named {name!r} (known: {known})")
        return source

    def pull(self, study_uid: str, source_name: str | None) -> PullResult:
        """Retrieve the study now, in this thread."""
        if not is_valid_uid(study_uid):
            raise InvalidStudyUid("the study is not given as a valid StudyInstanceUID")
        return self.puller.pull(self.source(source_name), study_uid)

    def request(self, study_uid: str, source_name: str | None) -> tuple[str, int]:
        """Check that the source has the study, then pull it in the background; returns the
        source's name and its instance count. Raises as `pull` does before the retrieval."""
        if not is_valid_uid(study_uid):
            raise InvalidStudyUid("the study is not given as a valid StudyInstanceUID")
        source = self.source(source_name)
        key = study_key(study_uid)
        count = source.instance_count(study_uid)
        if count is None:
            raise StudyNotFound(f"study {key} is not in {source.name}")
        with self._lock:
            if study_uid in self._running:
                return source.name, count
            self._running.add(study_uid)
        threading.Thread(
            target=self._pull_in_background,
            args=(source, study_uid),
            name=f"pull-{key}",
            daemon=True,
        ).start()
        return source.name, count

    def _pull_in_background(self, source: StudySource, study_uid: str) -> None:
        try:
            with log_context(study=study_key(study_uid)):
                try:
                    self.puller.pull(source, study_uid)
                except (AgentError, OSError) as exc:  # a source down, the spool full, ...
                    log.error("pull from %s failed: %s", source.name, exc)
        finally:
            with self._lock:
                self._running.discard(study_uid)

    def pollers(self) -> list[Poller]:
        """A poller for each source with a [sources.poll] table (not started)."""
        return [
            Poller(self.sources[s.name], s.poll, self.puller, self._db)
            for s in self._settings.sources
            if s.poll is not None
        ]

    def counts(self) -> CountsBySender | None:
        """The count check for the assembler, or None when no source verifies any sender."""
        by_sender: dict[str, StudySource] = {
            ae: source_for(s, self._settings.receiver.ae_title, timeout=COUNT_TIMEOUT_SECONDS)
            for s in self._settings.sources
            for ae in s.calling_ae_titles
        }
        return CountsBySender(by_sender) if by_sender else None
