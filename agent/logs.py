"""Logging setup and context (study key, job id); log lines never carry patient identity."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from agent.throttle import RepeatFilter

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "pacs_agent_log_context", default=None
)


def study_key(study_uid: str) -> str:
    """A short, stable, non-identifying key for a study: logs and status show this, not UIDs."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:16]


def accession_digest(accession_number: str) -> str:
    """The SHA-256 of an AccessionNumber as the database keeps it ("" for none): `status`
    finds a study by the number a person knows, and no number is stored to be shown. (A
    digest of so short a number is a lookup key, not an anonymisation.)"""
    value = accession_number.strip(" \0")
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest() if value else ""


def instance_key(path: Path) -> str:
    """A short, stable name for one file, e.g. "instance 3f2a9c1b0d4e": a spooled file is
    named by its SOP Instance UID, which a reason or a log line never shows."""
    digest = hashlib.sha256(path.name.encode("utf-8", "replace")).hexdigest()[:12]
    return f"instance {digest}"


def without_file_names(text: str, path: Path) -> str:
    """`text` (a library's error message) with `path`, its name and its stem (the UID)
    replaced by the file's instance key."""
    key = instance_key(path)
    for value in (str(path), path.name, path.stem):
        if value:
            text = text.replace(value, key)
    return text


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Attach fields (study, job) to every record logged inside the block."""
    merged = {**(_context.get() or {}), **fields}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get() or {}
        record.context = " ".join(f"{k}={v}" for k, v in fields.items())
        record.context_fields = fields
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "context_fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class PeerErrorFilter(logging.Filter):
    """One line, not a traceback, for what pynetdicom logs about a misbehaving peer.

    pynetdicom logs each undecodable PDU with its traceback; on a listener that someone scans
    or fuzzes that is a wall of stack traces per connection. The exception's type and message
    (PDU bytes and AE titles, never a dataset) stay, on the same line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.exc_info:
            exc = record.exc_info[1]
            message, detail = record.getMessage(), f"{type(exc).__name__}: {exc}"
            record.msg = (detail if message == str(exc) else f"{message} ({detail})")[:500]
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger (called once, by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.addFilter(PeerErrorFilter())
    # Out of file descriptors, an accept loop fails on every connection: once a minute is news.
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s %(context)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO, and some of its lines carry patient attributes.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom narrates every attribute it copies, naming source instances.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
