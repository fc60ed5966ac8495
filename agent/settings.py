"""The one typed, frozen configuration model, loaded from TOML; the only reader of settings."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError

AeTitle = Annotated[
    str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")
]
Port = Annotated[int, Field(ge=1, le=65535)]
# PS3.5 9.1: dot-separated numeric components without leading zeros, at most 64 characters.
UidStr = Annotated[str, Field(max_length=64, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Section):
    """A peer allowed to associate: its calling AE title and, optionally, its host."""

    ae_title: AeTitle
    host: str | None = None


class ReceiverSettings(_Section):
    ae_title: AeTitle = "PACS_AGENT"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    # Seconds of network silence after which an association is dropped (PS3.8 9.1.5 ARTIM/idle).
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Vendors' private storage SOP classes to accept as well (every standard one is accepted);
    # they are stored and listed, never processed. Default: Siemens CSA Non-Image Storage.
    private_sop_classes: tuple[UidStr, ...] = ("1.3.12.2.1107.5.9.1",)


class SpoolSettings(_Section):
    path: Path = Path("pacs-agent-data/spool")


class StudySettings(_Section):
    quiet_seconds: Annotated[float, Field(gt=0)] = 30.0


class QueueSettings(_Section):
    broker_url: str = "memory://"
    # Hard limit for one task; Redis's visibility timeout is set above it so that a task still
    # running is never handed to a second worker.
    task_time_limit_seconds: Annotated[int, Field(ge=10)] = 1800
    export_max_retries: Annotated[int, Field(ge=0)] = 8
    retry_backoff_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("broker_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if "://" not in value or scheme not in {"memory", "redis", "rediss"}:
            raise ValueError("must start with memory:// or redis:// (or rediss://)")
        return value

    @property
    def embedded(self) -> bool:
        """True when the broker lives inside the `serve` process (no separate workers)."""
        return self.broker_url.startswith("memory://")


class DatabaseSettings(_Section):
    # Empty means SQLite beside the spool: <spool parent>/pacs-agent.db.
    url: str = ""


Pattern = Annotated[str, Field(min_length=1, max_length=200)]


class SelectRules(_Section):
    """Which series of a study a model takes (all must hold); see `pacs-agent rules test`.

    Patterns are shell-style globs (`*`, `?`, `[...]`), matched case-insensitively against the
    whole value; ImageType is matched as its values joined by backslashes, as DICOM writes it
    (e.g. `ORIGINAL\\PRIMARY\\AXIAL`). An empty include list means "anything".
    """

    modalities: tuple[str, ...] = ("CT",)
    body_parts: tuple[Pattern, ...] = ()
    series_description_include: tuple[Pattern, ...] = ()
    series_description_exclude: tuple[Pattern, ...] = ()
    image_type_include: tuple[Pattern, ...] = ()
    image_type_exclude: tuple[Pattern, ...] = ("*LOCALIZER*",)
    min_slices: Annotated[int, Field(ge=2)] = 3
    # Compared with SliceThickness (median over the stack) when the images state it.
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] | None = None
    orientation: Literal["axial", "coronal", "sagittal", "oblique", "any"] = "axial"
    # "with": ContrastBolusAgent (or its sequence) is present and not empty; "without": it is not.
    contrast: Literal["any", "with", "without"] = "any"

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one modality is needed")
        return tuple(v.upper() for v in value)


class ModelSettings(_Section):
    name: str = "ct-tissue"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    select: SelectRules = SelectRules()


class DestinationSettings(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dimse"] = "dimse"
    ae_title: AeTitle
    host: str
    port: Port


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    """Everything pacs-agent reads from its configuration file."""

    receiver: ReceiverSettings = ReceiverSettings()
    spool: SpoolSettings = SpoolSettings()
    study: StudySettings = StudySettings()
    queue: QueueSettings = QueueSettings()
    database: DatabaseSettings = DatabaseSettings()
    models: tuple[ModelSettings, ...] = (ModelSettings(),)
    destinations: tuple[DestinationSettings, ...] = ()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (
            ("destinations", [d.name for d in self.destinations]),
            ("models", [m.name for m in self.models]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: names must be unique, got {names}")
        if not self.models:
            raise ValueError("models: at least one [[models]] entry is needed")
        return self

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.spool.path.parent / 'pacs-agent.db'}"


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the file's relative paths relative to the file, not the working directory."""
    spool = raw.get("spool")
    if isinstance(spool, dict) and isinstance(spool.get("path"), str):
        spool["path"] = str((base / os.path.expanduser(spool["path"])).resolve())
    database = raw.get("database")
    if isinstance(database, dict) and isinstance(database.get("url"), str):
        url = database["url"]
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
            database["url"] = prefix + str((base / url[len(prefix) :]).resolve())
    return raw


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: invalid value for '{key}': {first['msg']}"


def load_settings(path: Path | None) -> Settings:
    """Read and validate a TOML configuration file; None gives the embedded defaults.

    Raises ConfigError whose message names the file and the offending key.
    """
    if path is None:
        return Settings(spool=SpoolSettings(path=Path.cwd() / SpoolSettings().path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    raw = _resolve_paths(raw, path.resolve().parent)
    raw.setdefault("spool", {}).setdefault(
        "path", str(path.resolve().parent / SpoolSettings().path)
    )
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from exc
