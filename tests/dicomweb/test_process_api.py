"""POST /api/studies/{uid}/process: what the route answers before and after asking a source."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from agent.pull.api import MAX_BODY_BYTES, ProcessApi


class FakePulls:
    """Records the requests the route makes; answers as a source holding 3 instances."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []

    def request(self, uid: str, source: str | None) -> tuple[str, int]:
        self.requests.append((uid, source))
        return source or "orthanc", 3


def _call(chunks: list[bytes]) -> tuple[int, dict[str, Any], int, FakePulls]:
    """Run the route on a body sent in `chunks`; (status, answer, chunks read, pulls)."""
    pulls = FakePulls()
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        sent += 1
        more = sent < len(chunks)
        return {"type": "http.request", "body": chunks[sent - 1], "more_body": more}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/studies/1.2.3/process",
        "headers": [],
        "path_params": {"uid": "1.2.3"},
    }
    response = asyncio.run(ProcessApi(pulls).process(Request(scope, receive)))  # type: ignore[arg-type]
    return response.status_code, json.loads(bytes(response.body)), sent, pulls


def test_an_oversized_body_is_refused_as_it_arrives() -> None:
    chunks = [b" " * 1024] * 20  # 20 KiB of whitespace, in 1 KiB pieces
    status, answer, read, pulls = _call(chunks)
    assert status == 413 and answer == {"error": "request body too large"}
    assert read == MAX_BODY_BYTES // 1024 + 1  # stopped at the limit, not at the end
    assert pulls.requests == []


def test_a_body_that_is_not_the_json_asked_for_is_400() -> None:
    for body in (b"{", b"[1]", b'{"source": 3}'):
        status, answer, _, pulls = _call([body])
        assert status == 400 and "the body is JSON" in answer["error"], body
        assert pulls.requests == []


def test_a_source_named_in_pieces_is_asked() -> None:
    status, answer, _, pulls = _call([b'{"sour', b'ce": "archive"}'])
    assert status == 202
    assert answer["source"] == "archive" and answer["instances"] == 3
    assert pulls.requests == [("1.2.3", "archive")]
    status, _, _, pulls = _call([b""])  # no body: the only source
    assert status == 202 and pulls.requests == [("1.2.3", None)]
