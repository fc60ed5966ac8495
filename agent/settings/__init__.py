"""The one typed, frozen configuration model, loaded from TOML; the only reader of settings."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator

from agent.errors import ConfigError
from agent.settings.base import (
    AeTitle,
    EnvName,
    Pattern,
    Port,
    SecretRef,
    UidStr,
    _describe,
    _Section,
)
from agent.settings.listeners import (
    AllowedCaller,
    IpNetwork,
    ReceiverSettings,
    ReceiverTls,
    WebSettings,
    WebTls,
    WebUser,
)
from agent.settings.peers import (
    DestinationSettings,
    DestinationTls,
    DicomPeer,
    DicomWebEndpoint,
    HttpAuth,
    SourcePoll,
    SourceSettings,
)
from agent.settings.processing import (
    ModelSettings,
    ModelState,
    QueueSettings,
    SelectRules,
    StudySettings,
)
from agent.settings.storage import DatabaseSettings, LoggingSettings, SpoolSettings

# Listed so that `from agent.settings import X` stays the one import path for every section,
# type and helper, whichever module of the package defines it.
__all__ = [
    "AeTitle",
    "AllowedCaller",
    "DatabaseSettings",
    "DestinationSettings",
    "DestinationTls",
    "DicomPeer",
    "DicomWebEndpoint",
    "EnvName",
    "HttpAuth",
    "IpNetwork",
    "LoggingSettings",
    "ModelSettings",
    "ModelState",
    "Pattern",
    "Port",
    "QueueSettings",
    "ReceiverSettings",
    "ReceiverTls",
    "SecretRef",
    "SelectRules",
    "Settings",
    "SourcePoll",
    "SourceSettings",
    "SpoolSettings",
    "StudySettings",
    "UidStr",
    "WebSettings",
    "WebTls",
    "WebUser",
    "_Section",
    "_describe",
    "load_settings",
]


class Settings(_Section):
    """Everything pacs-agent reads from its configuration file."""

    receiver: ReceiverSettings = ReceiverSettings()
    spool: SpoolSettings = SpoolSettings()
    study: StudySettings = StudySettings()
    queue: QueueSettings = QueueSettings()
    database: DatabaseSettings = DatabaseSettings()
    models: tuple[ModelSettings, ...] = (ModelSettings(),)
    destinations: tuple[DestinationSettings, ...] = ()
    sources: tuple[SourceSettings, ...] = ()
    web: WebSettings = WebSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (
            ("destinations", [d.name for d in self.destinations]),
            ("models", [m.name for m in self.models]),
            ("sources", [s.name for s in self.sources]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: names must be unique, got {names}")
        senders = [ae.strip() for s in self.sources for ae in s.calling_ae_titles]
        if len(set(senders)) != len(senders):
            raise ValueError("sources: a calling AE title is listed by one source at most")
        if not self.models:
            raise ValueError("models: at least one [[models]] entry is needed")
        return self

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.spool.path.parent / 'pacs-agent.db'}"

    @property
    def audit_path(self) -> Path | None:
        """Where the audit trail is written: beside the spool unless set; None when off."""
        audit_file = self.logging.audit_file
        if audit_file is None:
            return self.spool.path.parent / "audit.log"
        return Path(audit_file) if audit_file else None


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
    section = raw.get("logging")
    if isinstance(section, dict) and isinstance(section.get("audit_file"), str):
        audit_file = section["audit_file"]
        if audit_file:  # "" turns the audit trail off; it is no path
            section["audit_file"] = str((base / os.path.expanduser(audit_file)).resolve())
    receiver = raw.get("receiver")
    if isinstance(receiver, dict):
        _resolve_tls_paths(receiver.get("tls"), base)
    web = raw.get("web")
    if isinstance(web, dict):
        _resolve_tls_paths(web.get("tls"), base)
        users = web.get("users")
        secrets = [
            *(web.get("tokens") or []),
            *(u.get("password") for u in users or [] if isinstance(u, dict)),
        ]
        for secret in secrets:
            _resolve_secret_file(secret, base)
    models = raw.get("models")
    if isinstance(models, list):
        for model in models:
            if isinstance(model, dict) and isinstance(model.get("package"), str):
                model["package"] = str((base / os.path.expanduser(model["package"])).resolve())
    destinations = raw.get("destinations")
    if isinstance(destinations, list):
        for destination in destinations:
            if isinstance(destination, dict):
                _resolve_tls_paths(destination.get("tls"), base)
    sources = raw.get("sources")
    if isinstance(sources, list):
        for source in sources:
            if isinstance(source, dict):
                _resolve_tls_paths(source.get("tls"), base)
                if isinstance(source.get("ca_certificates"), str):
                    source["ca_certificates"] = str(
                        (base / os.path.expanduser(source["ca_certificates"])).resolve()
                    )
                auth = source.get("auth")
                if isinstance(auth, dict):
                    _resolve_secret_file(auth.get("password"), base)
                    _resolve_secret_file(auth.get("token"), base)
    return raw


def _resolve_secret_file(secret: object, base: Path) -> None:
    """A SecretRef's file, made file-relative."""
    if isinstance(secret, dict) and isinstance(secret.get("file"), str):
        secret["file"] = str((base / os.path.expanduser(secret["file"])).resolve())


def _resolve_tls_paths(tls: object, base: Path) -> None:
    """The certificate, key, CA and password files of one `tls` table, made file-relative."""
    if not isinstance(tls, dict):
        return
    password = tls.get("private_key_password")
    for table, key in (
        (tls, "certificate"),
        (tls, "private_key"),
        (tls, "ca_certificates"),
        (password, "file"),
    ):
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = str((base / os.path.expanduser(table[key])).resolve())


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
