"""POST /api/studies/{uid}/process: pull a study from a source and process it (202)."""

from __future__ import annotations

import json
import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent.errors import ConfigError
from agent.logs import study_key
from agent.pull.service import InvalidStudyUid, Pulls
from agent.pull.source import SourceRefused, SourceUnavailable, StudyNotFound

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096


class ProcessApi:
    """The route; the body is optional JSON, `{"source": "<name>"}` (default: the only one).

    202 once the source has confirmed it holds the study: the retrieval goes on in the
    background, and the study's progress shows in GET /api/studies under its key. 404 for a
    study the source does not have, 400 for a bad UID or source name, 503 (with Retry-After
    when the source gave one) for a source that cannot be reached, 502 when it refuses.
    """

    def __init__(self, pulls: Pulls) -> None:
        self._pulls = pulls

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/studies/{uid}/process", self.process, methods=["POST"])]

    async def process(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        # Read as it arrives, and stop at the limit: a caller cannot make us hold more.
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, "request body too large")
        source: str | None = None
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                return _error(400, 'the body is JSON: {"source": "<name>"}')
            if not isinstance(data, dict) or not isinstance(data.get("source", ""), str):
                return _error(400, 'the body is JSON: {"source": "<name>"}')
            source = data.get("source") or None
        try:
            name, count = await run_in_threadpool(self._pulls.request, uid, source)
        except (InvalidStudyUid, ConfigError) as exc:
            return _error(400, str(exc))
        except StudyNotFound as exc:
            return _error(404, str(exc))
        except SourceUnavailable as exc:
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            return _error(503, str(exc), headers)
        except SourceRefused as exc:
            return _error(502, str(exc))
        key = study_key(uid)
        log.info("study %s to be pulled from %s (%d instances)", key, name, count)
        return JSONResponse(
            {"study_key": key, "source": name, "instances": count, "status": "pulling"}, 202
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status, headers=headers)
