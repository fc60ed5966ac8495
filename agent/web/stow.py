"""STOW-RS ingest (PS3.18 10.5): multipart/related application/dicom, streamed into the spool.

The promise is C-STORE's: a success is answered only once the instance is on disk, it lies
where a C-STORE would have put it, and the assembler is told of it the same way. Each part is
streamed to a temp file as it arrives (never held in memory), checked as the C-STORE handler
checks a dataset, and synced; only when the whole body has been read and found well formed are
the good ones renamed into place and announced. A body that breaks off or is malformed stores
nothing (400), so a sender that retries it never leaves half a request behind.

Like an association's end for C-STORE, each request's end tells the assembler, per study,
whether it was delivered cleanly or cut short (see agent.web.stow_news), so that a study whose
sender must send part of it again is not sealed on what came before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent import audit
from agent.db.values import CleanSend, Interruption
from agent.dicom.files import DEFAULT_MAX_BYTES
from agent.dicom.inflate import CorruptDeflate, InflatedTooLarge, check_inflated_size
from agent.dicom.uids import is_valid_uid
from agent.logs import log_context, study_key
from agent.receive.filemeta import read_file_meta
from agent.receive.handlers import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    MISSING_UIDS,
    OUT_OF_RESOURCES,
    SUCCESS,
    ArrivalSink,
    refusal_status,
)
from agent.receive.identify import Identifiers, Unreadable, identify_file, missing_uids
from agent.spool.arrival import admit
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.spool.writer import move_atomic
from agent.web.multipart import BodyCutOff, MediaType, MultipartError, boundary_of
from agent.web.stow_news import sender_news
from agent.web.stow_response import PROCESSING_FAILURE, Result, response_body
from agent.web.stow_upload import Body, Part, RequestTooLarge, Upload

log = logging.getLogger(__name__)

# PS3.18 I.2.2 Failure Reason values beyond the C-STORE statuses shared above.
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

DICOM_JSON = "application/dicom+json"
RETRY_AFTER_SECONDS = 60  # while the spool is low: retention frees space on its own schedule


@dataclass(frozen=True)
class StowPolicy:
    """What the STOW-RS door accepts: the receiver's SOP classes, transfer syntaxes and limits."""

    sop_classes: frozenset[str]
    transfer_syntaxes: frozenset[str]
    max_instance_bytes: int | None = None
    max_request_bytes: int | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class StowService:
    """POST /dicom-web/studies and /dicom-web/studies/{study}: store instances (PS3.18 10.5)."""

    def __init__(
        self,
        layout: SpoolLayout,
        sink: ArrivalSink,
        policy: StowPolicy,
        *,
        watermark: Watermark | None = None,
    ) -> None:
        self._layout = layout
        self._sink = sink
        self._policy = policy
        self._watermark = watermark

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dicom-web/studies", self.store, methods=["POST"]),
            Route("/dicom-web/studies/{study}", self.store, methods=["POST"]),
        ]

    async def store(self, request: Request) -> Response:
        began = datetime.now(UTC)
        body = Body(request)
        study = request.path_params.get("study")
        refusal = self._refusal(request)
        if refusal is not None:
            await body.drain()
            # The spool low, or the body over the limit: a study the path names waits for the
            # sender to send again, as for the same refusal of a request already under way.
            turned_away = {503: "refused, spool low", 413: "over the size limit"}
            how = turned_away.get(refusal.status_code)
            if how is not None:
                self._report(sender_news((), began=began, cut=how, study=study))
            return refusal
        boundary = boundary_of(MediaType.parse(request.headers["content-type"]))
        upload = Upload(
            self._layout.tmp,
            partial(self.check, study=study),
            watermark=self._watermark,
            max_instance_bytes=self._policy.max_instance_bytes,
            max_request_bytes=self._policy.max_request_bytes,
        )
        results: list[Result] = []
        # How the request broke off before it could be answered, for the assembler's news.
        cut: str | None = None
        try:
            checked = await upload.receive(body, boundary)
        except BodyCutOff as exc:
            await body.drain()
            cut = "cut off"
            status, response = 400, _error(400, f"malformed multipart body: {exc}")
        except MultipartError as exc:
            await body.drain()
            status, response = 400, _error(400, f"malformed multipart body: {exc}")
        except RequestTooLarge:
            limit = self._policy.max_request_bytes
            cut = "over the size limit"
            status, response = 413, _error(413, f"request body over the {limit}-byte limit")
        except ClientDisconnect:
            log.info("STOW-RS: client left before the end of its request; nothing stored")
            cut = "cut off"
            status, response = 400, _error(400, "client disconnected")
        except OSError as exc:  # the tmp folder cannot take another part file
            log.error("STOW-RS: spool write failed: %s; nothing stored", exc.strerror)
            await body.drain()
            cut = "failed, spool write failed"
            status, response = 503, _error(503, f"spool write failed: {exc.strerror}")
        else:
            results = await run_in_threadpool(self._commit, checked)
            status, response = self._answer(results)
        finally:
            await upload.discard()
        if cut is None:
            self._report(sender_news(results, began=began, study=study))
        else:
            self._report(sender_news(upload.checked(), began=began, cut=cut, study=study))
        self._audit(request, results, status)
        return response

    def _report(self, news: list[Interruption | CleanSend]) -> None:
        """Tell the assembler, after the request's arrivals, how it went for each study."""
        for item in news:
            self._sink(item)

    def _refusal(self, request: Request) -> Response | None:
        """The answer to a request refused before its body is read, else None."""
        media = MediaType.parse(request.headers.get("content-type", ""))
        if media.type != "multipart/related" or (
            media.params.get("type", "application/dicom").lower() != "application/dicom"
        ):
            # PS3.18 10.5.1.1: the payload of this door is multipart/related application/dicom;
            # the metadata-and-bulk-data form (application/dicom+json parts) is not taken.
            return _error(415, 'expected multipart/related; type="application/dicom"')
        try:
            boundary_of(media)
        except MultipartError as exc:
            return _error(400, str(exc))
        study = request.path_params.get("study")
        if study is not None and not is_valid_uid(study):
            return _error(400, "the path does not name a Study Instance UID")
        if self._watermark is not None:
            level = self._watermark.check()
            if level.low:
                headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
                return _error(503, f"spool low: {level.reason}", headers)
        limit = self._policy.max_request_bytes
        declared = request.headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"request body over the {limit}-byte limit")
        return None

    # -- one part, in a worker thread --------------------------------------------------------

    def check(self, part: Part, study: str | None) -> Result:
        """Close a received part's file and decide, as the C-STORE handler would."""
        try:
            return self._check(part, study)
        except Exception:  # the boundary for one part: the others are answered all the same
            log.exception("unexpected error checking an uploaded instance")
            return Result(PROCESSING_FAILURE, reason="internal error, instance not stored")

    def _check(self, part: Part, study: str | None) -> Result:
        part.close()
        with part.path.open("rb") as fp:
            try:
                meta = read_file_meta(fp)
            except Unreadable as exc:
                return self._refused(part, Result(CANNOT_UNDERSTAND, reason=str(exc)))
            named = Result(
                CANNOT_UNDERSTAND, sop_class_uid=meta.sop_class_uid, sop_uid=meta.sop_uid
            )
            syntax = meta.transfer_syntax_uid
            if not syntax:
                reason = "no transfer syntax in the file meta information"
                return self._refused(part, _with(named, CANNOT_UNDERSTAND, reason))
            if syntax not in self._policy.transfer_syntaxes:
                reason = f"transfer syntax {syntax[:64]} is not supported"
                return self._refused(part, _with(named, TRANSFER_SYNTAX_NOT_SUPPORTED, reason))
            start = fp.tell()
            try:
                ids = identify_file(fp, UID(syntax))
            except Unreadable as exc:
                return self._refused(part, _with(named, CANNOT_UNDERSTAND, str(exc)))
            if syntax == DeflatedExplicitVRLittleEndian and part.refusal is None:
                # As the C-STORE handler does: the limit holds for the inflated dataset too.
                fp.seek(start)
                limit = self._policy.max_instance_bytes or DEFAULT_MAX_BYTES
                try:
                    check_inflated_size(fp, limit)
                except InflatedTooLarge as exc:
                    return self._refused(part, _with(ids, OUT_OF_RESOURCES, str(exc)))
                except CorruptDeflate as exc:
                    return self._refused(part, _with(ids, CANNOT_UNDERSTAND, str(exc)))
        if part.refusal is not None:  # the spool was low, or the part over the size limit
            return self._refused(part, _with(ids, *part.refusal))
        missing = missing_uids(ids)
        if missing:
            reason = "missing or invalid " + ", ".join(missing)
            return self._refused(part, _with(ids, MISSING_UIDS, reason))
        # PS3.10 7.1: the meta group names the SOP Class and Instance of the dataset it heads,
        # as a C-STORE request does (PS3.4 B.2.3); where it names them, they must match.
        if meta.sop_class_uid not in ("", ids.sop_class_uid) or meta.sop_uid not in (
            "",
            ids.sop_uid,
        ):
            reason = "SOP Class or Instance UID differs from the file meta information"
            return self._refused(part, _with(ids, DOES_NOT_MATCH_SOP_CLASS, reason))
        if ids.sop_class_uid not in self._policy.sop_classes:
            reason = "not a storage SOP class this receiver accepts"
            return self._refused(part, _with(ids, SOP_CLASS_NOT_SUPPORTED, reason))
        if study is not None and ids.study_uid != study:
            # PS3.18 10.5.1: a request to /studies/{study} stores only that study's instances.
            reason = "instance of another study than the request's"
            return self._refused(part, _with(ids, DOES_NOT_MATCH_SOP_CLASS, reason))
        try:
            with part.path.open("rb+") as fp:
                os.fdatasync(fp.fileno())
        except OSError as exc:
            reason = f"spool write failed: {exc.strerror}"
            return self._refused(part, _with(ids, OUT_OF_RESOURCES, reason))
        return Result(
            SUCCESS,
            ids.sop_class_uid,
            ids.sop_uid,
            ids.study_uid,
            ids.series_uid,
            spooled=part.path,
            accession_number=ids.accession_number,
        )

    @staticmethod
    def _refused(part: Part, result: Result) -> Result:
        fields = {"study": study_key(result.study_uid)} if is_valid_uid(result.study_uid) else {}
        with log_context(**fields):
            log.warning("rejected an uploaded instance: %s", result.reason)
        part.path.unlink(missing_ok=True)
        return result

    # -- the whole request -------------------------------------------------------------------

    def _commit(self, results: list[Result]) -> list[Result]:
        """Rename every checked instance into place and announce it (a worker thread)."""
        return [self._commit_one(result) for result in results]

    def _commit_one(self, result: Result) -> Result:
        if not result.stored or result.spooled is None:
            return result
        # The sink only queues the arrival for the assembler; were it to fail, the request
        # fails (HTTP 500): stored, not acknowledged, and found by the spool scan at start.
        place = partial(move_atomic, result.spooled)
        failure = admit(self._layout, result, place, self._sink)
        if failure is not None:
            return _with(result, refusal_status(failure), failure.reason)
        return replace(result, spooled=None)

    @staticmethod
    def _answer(results: list[Result]) -> tuple[int, Response]:
        """PS3.18 10.5.3: 200 all stored, 202 some, 409 none; the body per Annex I."""
        if not results:
            return 400, _error(400, "the request holds no instance")
        stored = sum(result.stored for result in results)
        status = 200 if stored == len(results) else 202 if stored else 409
        return status, JSONResponse(response_body(results), status, media_type=DICOM_JSON)

    def _audit(self, request: Request, results: list[Result], status: int) -> None:
        tallies: dict[str | None, list[int]] = {}
        for result in results:
            key = study_key(result.study_uid) if is_valid_uid(result.study_uid) else None
            tally = tallies.setdefault(key, [0, 0])
            tally[0 if result.stored else 1] += 1
        stored = sum(t[0] for t in tallies.values())
        refused = sum(t[1] for t in tallies.values())
        client = request.client
        log.info(
            "STOW-RS from %s: %d stored, %d refused (HTTP %d)",
            client.host if client else "?",
            stored,
            refused,
            status,
        )
        server = request.scope.get("server") or (None, None)
        principal = request.scope.get("principal")
        audit.instances_received(
            source=audit.Peer(address=client.host, port=client.port) if client else audit.Peer(),
            destination=audit.Peer(address=server[0], port=server[1]),
            studies=[audit.StudyCount(k, s, r) for k, (s, r) in tallies.items()],
            ended=f"HTTP {status}",
            user=getattr(principal, "name", None),
        )


def _with(named: Result | Identifiers, status: int, reason: str) -> Result:
    """A refusal of the instance `named` (by its file meta group, or its dataset)."""
    return Result(
        status, named.sop_class_uid, named.sop_uid, named.study_uid, named.series_uid, reason
    )
