"""The small JSON API: health for probes, and recent studies as `pacs-agent status` lists them."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent import __version__
from agent.db.database import Database
from agent.db.values import StudyStatus
from agent.spool.watermark import Watermark
from agent.spool.writable import SpoolWritable

HEALTH_PATH = "/api/health"
MAX_STUDIES = 500


def study_json(row: StudyStatus) -> dict[str, Any]:
    """One study as `pacs-agent status` prints it: its key, never a UID or patient identity."""
    return {
        "study_key": row.study_key,
        "state": str(row.state),
        "reason": row.reason or None,
        "instance_count": row.instance_count,
        "stages": [{"state": str(state), "at": at.isoformat()} for state, at in row.stages],
    }


class Api:
    """GET /api/health (no credentials: for load balancers and monitoring) and /api/studies."""

    def __init__(
        self,
        db: Database,
        watermark: Watermark | None = None,
        writable: SpoolWritable | None = None,
    ) -> None:
        self._db = db
        self._watermark = watermark
        self._writable = writable

    def routes(self) -> list[BaseRoute]:
        return [
            Route(HEALTH_PATH, self.health, methods=["GET"]),
            Route("/api/studies", self.studies, methods=["GET"]),
        ]

    async def health(self, _request: Request) -> Response:
        # A spool that cannot be written fails every C-STORE and STOW-RS upload: the service
        # is down for its one job, and the probe says so.
        problem = None
        if self._writable is not None:
            problem = await run_in_threadpool(self._writable.problem)
        if problem is not None:
            return JSONResponse(
                {"status": "error", "spool": f"not writable ({problem})", "version": __version__},
                503,
            )
        # Up is up: a low spool is reported, not turned into a failed probe that would take
        # the status API away with it; STOW-RS answers 503 itself meanwhile.
        low = self._watermark is not None and self._watermark.check().low
        return JSONResponse(
            {"status": "ok", "spool": "low" if low else "ok", "version": __version__}
        )

    async def studies(self, request: Request) -> Response:
        text = request.query_params.get("limit", "50")
        if not text.isdigit() or not 1 <= int(text) <= MAX_STUDIES:
            return JSONResponse({"error": f"limit is a number from 1 to {MAX_STUDIES}"}, 400)
        rows = await run_in_threadpool(self._db.recent, int(text))
        return JSONResponse({"studies": [study_json(row) for row in rows]})
