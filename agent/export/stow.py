"""STOW-RS export (PS3.18 10.5) with dicomweb-client: chunked requests, per-instance answers.

Each stored instance is recorded with its status: success, or the WarningReason (0008,1196)
the server gave; each failed one with its FailureReason (0008,1197). Retrying is the outbox's
business: HTTP 5xx, 408, 409 without a readable body, 429 (honouring Retry-After) and network
failures raise RetryableError; any other 4xx raises DestinationRefused with the server's own
message, since sending the same request again cannot help.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from agent.db.deliveries import ObjectStatus
from agent.dicomweb.client import client_for, http_failure
from agent.errors import PermanentError, RetryableError
from agent.settings import DestinationSettings

# PS3.18 Table 10.5.3-1 keywords are in pydicom's dictionary: ReferencedSOPSequence,
# FailedSOPSequence, FailureReason, WarningReason. 0x0110 "Processing failure" is what a
# failed item without a reason gets (PS3.7 C.4.2).
PROCESSING_FAILURE = 0x0110


class RetryLater(RetryableError):
    """A retryable failure for which the server said when to come back (Retry-After)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DestinationRefused(PermanentError):
    """The destination answered with a 4xx that retrying cannot change (401, 403, 413, ...)."""


def send(
    destination: DestinationSettings,
    calling_ae: str,
    files: Sequence[Path],
    record: Callable[[ObjectStatus], None],
) -> None:
    """STOW-RS the files in chunks, handing each instance's answer to `record`."""
    if not files:
        return
    with _client(destination, "STOW-RS") as client:
        for chunk in _chunks(files, destination.stow_max_instances, destination.stow_max_bytes):
            datasets = [dcmread(path) for path in chunk]
            try:
                response = client.store_instances(datasets)
            except requests.HTTPError as exc:
                conflict = _conflict_body(exc)
                if conflict is None:
                    raise
                response = conflict
            _record_answers(datasets, response, record)


def check(destination: DestinationSettings) -> None:
    """Ask the server for one study: reachable and the credentials accepted, or an error why."""
    with _client(destination, "QIDO-RS") as client:
        client.search_for_studies(limit=1)


@contextmanager
def _client(destination: DestinationSettings, service: str) -> Iterator[DICOMwebClient]:
    """The destination's client, closed after use; a failed request raises RetryLater or
    DestinationRefused, as its HTTP status or network failure says."""
    client = client_for(destination)
    try:
        yield client
    except requests.RequestException as exc:
        failure = http_failure(
            exc, f"destination {destination.name}: {service}", destination.timeout_seconds
        )
        if failure.retryable:
            raise RetryLater(failure.message, failure.retry_after) from None
        raise DestinationRefused(failure.message) from None
    finally:
        client._session.close()  # dicomweb-client keeps it privately; close its sockets


def _chunks(files: Sequence[Path], max_count: int, max_bytes: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    size = 0
    for path in files:
        length = path.stat().st_size
        if chunk and (len(chunk) >= max_count or size + length > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += length
    if chunk:
        yield chunk


def _conflict_body(exc: requests.HTTPError) -> Dataset | None:
    """PS3.18 10.5.3: 409 Conflict when no instance was stored, with the reasons in the body."""
    response = exc.response
    if response is None or response.status_code != 409:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None


def _record_answers(
    sent: Sequence[Dataset], response: Dataset, record: Callable[[ObjectStatus], None]
) -> None:
    by_uid = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sent}
    answered: set[str] = set()
    for item in response.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in by_uid:
            warning = int(item.get("WarningReason", 0) or 0)
            record(ObjectStatus(uid, by_uid[uid], warning))
            answered.add(uid)
    for item in response.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in by_uid:
            reason = int(item.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE)
            record(ObjectStatus(uid, by_uid[uid], reason))
            answered.add(uid)
    missing = [uid for uid in by_uid if uid not in answered]
    if missing and not answered and not response:
        # A 200 with no body (some servers answer so): every instance of the request stored.
        for uid in missing:
            record(ObjectStatus(uid, by_uid[uid], 0x0000))
        return
    for uid in missing:
        record(ObjectStatus(uid, by_uid[uid], PROCESSING_FAILURE, "not in the STOW-RS response"))
