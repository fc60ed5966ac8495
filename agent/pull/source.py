"""One configured archive as QIDO-RS searches and WADO-RS retrievals, with failures named."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Protocol

import requests

from agent.dicomweb.client import client_for, http_failure
from agent.errors import PermanentError, RetryableError
from agent.settings import SourcePoll, SourceSettings

log = logging.getLogger(__name__)

# PS3.18 10.6.3.3 (QIDO-RS study attributes) as tags in the DICOM JSON model (PS3.18 F.2).
_STUDY_UID = "0020000D"
_DESCRIPTION = "00081030"
_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances
# PS3.18 8.7.3.5.2: any transfer syntax, as the archive keeps it; no transcoding asked for.
_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class SourceUnavailable(RetryableError):
    """The source cannot be reached or answers with a transient error: try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceRefused(PermanentError):
    """The source answered with an error that repeating the request will not change."""


class StudyNotFound(PermanentError):
    """The source does not have the study."""


@dataclass(frozen=True)
class FoundStudy:
    """A study a search found: its UID and, when the source says, how many instances it has."""

    study_uid: str
    instances: int | None = None


@dataclass(frozen=True)
class StudyRow:
    """One study-level match, as either kind of source reads it from its answer."""

    study_uid: str
    description: str
    instances: int | None


def poll_queries(poll: SourcePoll, today: date) -> list[dict[str, str]]:
    """The matching keys of a poll's study-level searches, one search per modality: PS3.4
    C.2.2.2.1 gives multiple-value matching to UIDs only."""
    filters: dict[str, str] = {}
    if poll.study_date_days is not None:
        first = today - timedelta(days=poll.study_date_days)
        filters["StudyDate"] = f"{first:%Y%m%d}-{today:%Y%m%d}"
    return [
        dict(filters, ModalitiesInStudy=modality) if modality else dict(filters)
        for modality in poll.modalities or (None,)
    ]


def matching(rows: Iterable[StudyRow], poll: SourcePoll) -> list[FoundStudy]:
    """The studies among `rows` whose description fits the poll's pattern, each once."""
    pattern = poll.study_description
    found: dict[str, FoundStudy] = {}
    for row in rows:
        if not row.study_uid:
            continue
        if pattern is not None and not fnmatch.fnmatchcase(
            row.description.lower(), pattern.lower()
        ):
            continue
        found[row.study_uid] = FoundStudy(row.study_uid, row.instances)
    return list(found.values())


def count_in(rows: Iterable[StudyRow], study_uid: str, what: str) -> int | None:
    """NumberOfStudyRelatedInstances of the study among `rows`; None when it is not there."""
    for row in rows:
        if row.study_uid == study_uid:
            if row.instances is None:
                raise SourceRefused(f"{what}: no NumberOfStudyRelatedInstances in the answer")
            return row.instances
    return None


class StudySource(Protocol):
    """What the puller, the poller and the count check need of a source (a seam for tests)."""

    @property
    def name(self) -> str: ...

    def instance_count(self, study_uid: str) -> int | None:
        """NumberOfStudyRelatedInstances; None when the source does not have the study."""

    def search(self, poll: SourcePoll, today: date) -> list[FoundStudy]:
        """The studies that match the poll's filters."""

    def instances(self, study_uid: str) -> Iterator[bytes]:
        """Each instance of the study as a Part 10 file, streamed."""


class DicomWebSource:
    """A DICOMweb archive; the client is made on first use (secrets are read then)."""

    def __init__(self, settings: SourceSettings, *, timeout: float | None = None) -> None:
        self.settings = settings
        # The count check runs on the assembler's thread: it must not wait a minute for a reply.
        self._endpoint = (
            settings
            if timeout is None
            else settings.model_copy(
                update={"timeout_seconds": min(timeout, settings.timeout_seconds)}
            )
        )
        self._client: Any = None

    @property
    def name(self) -> str:
        return self.settings.name

    def _web(self) -> Any:
        if self._client is None:
            self._client = client_for(self._endpoint)
        return self._client

    def instance_count(self, study_uid: str) -> int | None:
        rows = self._qido(
            {"StudyInstanceUID": study_uid}, ("NumberOfStudyRelatedInstances",), limit=2
        )
        return count_in(map(_row, rows), study_uid, f"QIDO-RS at {self.name}")

    def search(self, poll: SourcePoll, today: date) -> list[FoundStudy]:
        fields = ("NumberOfStudyRelatedInstances", "StudyDescription")
        rows: list[Mapping[str, Any]] = []
        for query in poll_queries(poll, today):
            rows += self._qido(query, fields, limit=poll.limit)
        return matching(map(_row, rows), poll)

    def instances(self, study_uid: str) -> Iterator[bytes]:
        what = f"WADO-RS from {self.name}"
        client = self._web()
        url = f"{client.base_url}/studies/{study_uid}"
        try:
            # dicomweb-client's public iter_study parses every instance into a pydicom Dataset;
            # its own request and multipart decoder are used here so that the spool gets the
            # archive's bytes unchanged, checked exactly as a C-STORE dataset is.
            response = client._http_get(url, headers={"Accept": _AS_STORED}, stream=True)
            if response.headers.get("Content-Type", "").startswith("application/dicom"):
                # Not multipart, as some servers answer for a single instance (PS3.18 8.7.3.2).
                yield response.content
                return
            yield from client._decode_multipart_message(response, stream=True)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise StudyNotFound(f"{what}: the study is not there") from None
            raise _named(exc, what) from None
        except (requests.RequestException, ValueError) as exc:
            raise _named(exc, what) from None

    def _qido(
        self, filters: Mapping[str, Any], fields: Sequence[str], *, limit: int
    ) -> list[Mapping[str, Any]]:
        what = f"QIDO-RS at {self.name}"
        try:
            rows = self._web().search_for_studies(
                search_filters=dict(filters), fields=list(fields), limit=limit
            )
        except requests.RequestException as exc:
            raise _named(exc, what) from None
        except ValueError as exc:  # a body that is not DICOM JSON
            raise SourceRefused(f"{what}: unreadable answer ({type(exc).__name__})") from None
        return list(rows or [])


def _named(exc: Exception, what: str) -> SourceUnavailable | SourceRefused:
    failure = http_failure(exc, what)
    if failure.retryable:
        return SourceUnavailable(failure.message, failure.retry_after)
    return SourceRefused(failure.message)


def _row(row: Mapping[str, Any]) -> StudyRow:
    return StudyRow(_text(row, _STUDY_UID), _text(row, _DESCRIPTION), _int(row, _INSTANCES))


def _value(row: Mapping[str, Any], tag: str) -> Any:
    element = row.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _text(row: Mapping[str, Any], tag: str) -> str:
    value = _value(row, tag)
    return str(value).strip() if value is not None else ""


def _int(row: Mapping[str, Any], tag: str) -> int | None:
    value = _value(row, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
