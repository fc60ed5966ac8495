"""Where pacs-agent keeps things on this host: the spool, the database, the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from agent.settings.base import _Section


class SpoolSettings(_Section):
    path: Path = Path("pacs-agent-data/spool")
    # The spool is "low" when its filesystem has less free space than either floor; while low,
    # C-STORE gets 0xA700 and new associations are rejected as transient (temporary congestion).
    min_free_percent: Annotated[float, Field(ge=0, le=100)] = 10.0
    min_free_gb: Annotated[float, Field(ge=0)] = 5.0
    # Days a `done` or `skipped` study's files are kept after its last change; 0 keeps them.
    retention_days: Annotated[float, Field(ge=0)] = 7.0


class DatabaseSettings(_Section):
    # Empty means SQLite beside the spool: <spool parent>/pacs-agent.db.
    url: str = ""


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    # The audit trail (agent.audit): one JSON line per association, per association's instances,
    # per export, per start and stop. Unset: audit.log beside the spool; "" turns it off.
    audit_file: str | None = None
