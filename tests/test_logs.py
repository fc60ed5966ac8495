"""Logging setup: a misbehaving peer costs one line, not a traceback."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from agent.logs import configure_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "text")
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_pynetdicom_tracebacks_become_one_line(captured: io.StringIO) -> None:
    log = logging.getLogger("pynetdicom.dul")
    try:
        raise ValueError("Unable to decode '46 55 5A' using the ascii codec(s)")
    except ValueError as exc:
        log.exception(exc)
    try:
        raise KeyError(47)
    except KeyError:
        log.exception("Unable to decode the received PDU data")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "ValueError: Unable to decode '46 55 5A' using the ascii codec(s)" in lines[0]
    assert "Unable to decode the received PDU data (KeyError: 47)" in lines[1]
    assert "Traceback" not in captured.getvalue()


def test_our_own_tracebacks_are_kept(captured: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("agent.assembly").exception("assembler iteration failed")
    assert "Traceback" in captured.getvalue()
