"""The one typed, frozen configuration model, loaded from TOML; the only reader of settings."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError

AeTitle = Annotated[
    str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")
]
Port = Annotated[int, Field(ge=1, le=65535)]
# PS3.5 9.1: dot-separated numeric components without leading zeros, at most 64 characters.
UidStr = Annotated[str, Field(max_length=64, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")]
# A shell-style glob (`*`, `?`, `[...]`), matched case-insensitively against a whole value.
Pattern = Annotated[str, Field(min_length=1, max_length=200)]
# A model's switch: run it, hold its studies, or do not run it at all.
ModelState = Literal["on", "paused", "off"]


class _Section(BaseModel):
    # Errors name the key, never repeat the value: it may be a secret written where it should not.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class SecretRef(_Section):
    """Where a secret is kept, a file or a named environment variable; never the value itself.

    `reveal()` reads it when it is used rather than when the configuration is loaded, so that
    commands which do not need it (`status`, `rules test`) run without access to it. A plain
    string in the configuration file is refused: that file is read by people and copied around.
    """

    file: Path | None = None
    env: EnvName | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                "a secret is not written in the configuration file: use "
                '{ file = "/run/secrets/NAME" } or { env = "VARIABLE" }'
            )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        return self

    def __str__(self) -> str:
        if self.file is not None:
            return f"secret file {self.file}"
        return f"environment variable {self.env}"

    def reveal(self) -> SecretStr:
        """Read the secret now; a ConfigError names where it was looked for, never the value."""
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read {self}: {exc.strerror}") from None
            except UnicodeDecodeError:
                # `from None`: the decode error carries the file's bytes.
                raise ConfigError(f"{self} is not UTF-8 text") from None
            # The newline that `echo` or an editor leaves is not part of the secret.
            value = text.rstrip("\r\n")
        else:
            assert self.env is not None
            if self.env not in os.environ:
                raise ConfigError(f"{self} is not set")
            value = os.environ[self.env]
        if not value:
            raise ConfigError(f"{self} is empty")
        return SecretStr(value)


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowedCaller(_Section):
    """A peer allowed to associate: its calling AE title and, optionally, where it calls from.

    `host` is an IP address, a network in CIDR notation (IPv4 or IPv6), or a host name, which
    the receiver resolves once when it starts.
    """

    ae_title: AeTitle
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        try:
            ipaddress.ip_network(value)
            return value
        except ValueError as exc:
            if "/" in value or ":" in value:
                hint = ""
                if "host bits set" in str(exc):
                    hint = f": write the network, {ipaddress.ip_network(value, strict=False)}"
                raise ValueError(f"{value} is not an IP address or network ({exc}){hint}") from None
        # RFC 1123 2.1: a name's last label is never all digits, so "10.1.2" is a typo, not a name.
        last_label = value.rstrip(".").rsplit(".", 1)[-1]
        if len(value) > 253 or not _HOST_NAME.fullmatch(value) or last_label.isdigit():
            raise ValueError(f"{value} is not an IP address, a CIDR network or a host name")
        return value

    @property
    def network(self) -> IpNetwork | None:
        """`host` as addresses; None when it is a host name (resolved at start) or absent."""
        if self.host is None:
            return None
        try:
            return ipaddress.ip_network(self.host)
        except ValueError:
            return None


class ReceiverTls(_Section):
    """DICOM TLS on the listener (PS3.15 Annex B): its own certificate, and whom it trusts."""

    certificate: Path
    private_key: Path
    private_key_password: SecretRef | None = None
    # The CAs whose client certificates are accepted; without it no client certificate is asked.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_trust(self) -> ReceiverTls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate needs ca_certificates, the CAs that issue them"
            )
        return self


class DestinationTls(_Section):
    """DICOM TLS to a destination: which CAs to trust, and a client certificate if it asks."""

    # Without it, the system's trusted CAs.
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    private_key_password: SecretRef | None = None
    # Check that the destination's certificate names `server_name` (default: its host).
    verify_hostname: bool = True
    server_name: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _key_pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key are given together")
        if self.private_key_password is not None and self.private_key is None:
            raise ValueError("private_key_password needs private_key")
        return self


class ReceiverSettings(_Section):
    ae_title: AeTitle = "PACS_AGENT"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    # Seconds of network silence after which an association is dropped (PS3.8 9.1.5 ARTIM/idle).
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Seconds a connection may take to complete its association request (PS3.8 9.1.5 ARTIM):
    # a peer that sends half a request holds a slot of max_associations until then.
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # Vendors' private storage SOP classes to accept as well (every standard one is accepted);
    # they are stored and listed, never processed. Default: Siemens CSA Non-Image Storage.
    private_sop_classes: tuple[UidStr, ...] = ("1.3.12.2.1107.5.9.1",)
    # Other called AE titles answered besides ae_title (any other is rejected, PS3.8 Table 9-21).
    accepted_called_ae_titles: tuple[AeTitle, ...] = ()
    # With a [receiver.tls] table the port speaks DICOM TLS only (2762 is its registered port).
    tls: ReceiverTls | None = None
    # Largest dataset accepted in one C-STORE; a larger one is refused with 0xA700 and not
    # written; past it, the rest of the dataset is read and dropped, not held in memory.
    max_instance_bytes: Annotated[int, Field(ge=1)] = 2 * 1024**3

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """Every AE title this receiver answers to: its own first, then the aliases."""
        return (self.ae_title, *self.accepted_called_ae_titles)


class SpoolSettings(_Section):
    path: Path = Path("pacs-agent-data/spool")
    # The spool is "low" when its filesystem has less free space than either floor; while low,
    # C-STORE gets 0xA700 and new associations are rejected as transient (temporary congestion).
    min_free_percent: Annotated[float, Field(ge=0, le=100)] = 10.0
    min_free_gb: Annotated[float, Field(ge=0)] = 5.0
    # Days a `done` or `skipped` study's files are kept after its last change; 0 keeps them.
    retention_days: Annotated[float, Field(ge=0)] = 7.0


class StudySettings(_Section):
    quiet_seconds: Annotated[float, Field(gt=0)] = 30.0
    # A study pushed by a sender that a [[sources]] entry lists in calling_ae_titles is checked
    # against that source (its NumberOfStudyRelatedInstances) after this many quiet seconds,
    # then again after twice, four times as many, ...; it starts as soon as the counts match.
    verify_after_seconds: Annotated[float, Field(gt=0)] = 2.0


class QueueSettings(_Section):
    broker_url: str = "memory://"
    # Hard limit for one task; Redis's visibility timeout is set above it so that a task still
    # running is never handed to a second worker.
    task_time_limit_seconds: Annotated[int, Field(ge=10)] = 1800
    # Retries of inference (a worker without its GPU, a volume read that failed) and of the
    # steps of an export before it sends; sending retries per destination, see [[destinations]].
    max_retries: Annotated[int, Field(ge=0)] = 8
    retry_backoff_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    # A study queued, inferring or exporting without a state change for this long is sent to
    # the broker again (its message may have died with a Redis that keeps nothing on disk).
    # Empty: the visibility timeout, after which Redis itself would redeliver an unacknowledged
    # message, and by which any task still running has long been stopped by the time limit.
    stale_after_seconds: Annotated[float, Field(gt=0)] | None = None
    # Calling AE titles (shell-style globs, case-insensitive) whose studies are urgent, e.g. the
    # emergency department's CT: their jobs go to the urgent queues, ahead of normal ones.
    urgent_senders: tuple[Pattern, ...] = ()
    # While normal jobs wait, at most this many urgent jobs in a row run before one normal job
    # does, so that a stream of urgent studies never starves the others.
    urgent_burst: Annotated[int, Field(ge=1)] = 3

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

    @property
    def visibility_timeout_seconds(self) -> int:
        """How long Redis keeps an unacknowledged message before redelivering it."""
        return 2 * self.task_time_limit_seconds + 60

    @property
    def stale_after(self) -> float:
        """Seconds without a state change after which an in-flight study is sent again."""
        if self.stale_after_seconds is not None:
            return self.stale_after_seconds
        return float(self.visibility_timeout_seconds)


class DatabaseSettings(_Section):
    # Empty means SQLite beside the spool: <spool parent>/pacs-agent.db.
    url: str = ""


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
    # "urgent": every study this model takes is urgent (e.g. a stroke model), see [queue].
    priority: Literal["normal", "urgent"] = "normal"
    # "off" is the kill switch: the model is not run, and a study with no other model is
    # skipped. "paused": its studies are sealed and queued but held until it is "on" again.
    # `pacs-agent models on|pause|off NAME` overrides this at run time, without a restart.
    state: ModelState = "on"
    # "auto": the GPU (cuda:0 of those the process sees) when there is one, else the CPU with
    # a warning; "cuda" or "cuda:N": that GPU or retry later; "cpu". A worker's --device
    # replaces "auto".
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    select: SelectRules = SelectRules()
    # A model package (a folder, .zip or .tar with a model.toml, see README "Model packages");
    # unset: the built-in model called `name` (ct-tissue).
    package: Path | None = None
    # "package": as the package's manifest says; else the network's precision on CUDA.
    precision: Literal["package", "float32", "float16", "bfloat16"] = "package"


class HttpAuth(_Section):
    """How pacs-agent authenticates to a DICOMweb server: not at all, basic, or a bearer token."""

    kind: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: SecretRef | None = None
    token: SecretRef | None = None

    @model_validator(mode="after")
    def _complete(self) -> HttpAuth:
        if self.kind == "basic" and (self.username is None or self.password is None):
            raise ValueError("basic auth needs username and password")
        if self.kind == "bearer" and self.token is None:
            raise ValueError("bearer auth needs token")
        return self


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/") if value is not None else None


class DicomWebEndpoint(_Section):
    """A DICOMweb server: its base URL (the one /studies hangs off), auth and TLS checks."""

    url: str | None = None
    auth: HttpAuth = HttpAuth()
    # TLS certificates are checked against the system's CAs, or these when given.
    verify_tls: bool = True
    ca_certificates: Path | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _http_url(value)


class DicomPeer(DicomWebEndpoint):
    """A destination or source: a DICOM peer (`dimse`) or a DICOMweb server (`dicomweb`)."""

    role: ClassVar[str] = "peer"
    kind: Literal["dimse", "dicomweb"]
    # dimse: the peer's AE title and address.
    ae_title: AeTitle | None = None
    host: str | None = None
    port: Port | None = None
    # DICOM TLS; `tls = true` (or `{}`) trusts the system's CAs and checks the host name.
    tls: DestinationTls | None = None

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {} if value else None
        return value

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Self:
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        if self.kind == "dimse":
            missing = [key for key, value in dimse.items() if value is None]
            if missing:
                raise ValueError(f"a dimse {self.role} needs {', '.join(missing)}")
            if self.url is not None:
                raise ValueError('url is for kind = "dicomweb"')
        else:
            if self.url is None:
                raise ValueError(f"a dicomweb {self.role} needs url")
            given = [key for key, value in {**dimse, "tls": self.tls}.items() if value is not None]
            if given:
                raise ValueError(f'{", ".join(given)}: for kind = "dimse" (use an https:// url)')
        return self


class DestinationSettings(DicomPeer):
    """Where results go: a DICOM peer by C-STORE (`dimse`) or a DICOMweb server by STOW-RS."""

    role: ClassVar[str] = "destination"
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dimse", "dicomweb"] = "dimse"
    # dicomweb (`url`, `auth`, `verify_tls`, `ca_certificates`, `timeout_seconds` as for any
    # DICOMweb endpoint): objects go in requests of at most this many instances and bytes.
    stow_max_instances: Annotated[int, Field(ge=1)] = 50
    stow_max_bytes: Annotated[int, Field(ge=1)] = 100 * 1024 * 1024
    # A failed export is tried again after retry_backoff_seconds, doubling up to
    # retry_backoff_max_seconds, each wait drawn at random from its upper half (jitter);
    # after give_up_after_hours without success the study ends `failed: export to <name>`.
    retry_backoff_seconds: Annotated[float, Field(gt=0)] = 10.0
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    give_up_after_hours: Annotated[float, Field(gt=0)] = 24.0
    # Circuit breaker: after this many failed attempts in a row (any study, any worker) nobody
    # connects until a backoff has passed; then one worker probes, and a success closes it.
    breaker_failures: Annotated[int, Field(ge=1)] = 3


class SourcePoll(_Section):
    """Watching a source: which new studies its search (QIDO-RS or C-FIND) finds, and how
    often it looks."""

    interval_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Only studies with one of these in ModalitiesInStudy; empty: any modality.
    modalities: tuple[Annotated[str, Field(min_length=1, max_length=16)], ...] = ()
    # Only studies whose StudyDate is today or up to this many days before; unset: any date.
    study_date_days: Annotated[int, Field(ge=0)] | None = None
    # A shell-style glob matched case-insensitively against StudyDescription; unset: any.
    study_description: Pattern | None = None
    # The most studies one search returns (per modality when modalities are given).
    limit: Annotated[int, Field(ge=1, le=10000)] = 100
    # Studies already in the archive when the source is first watched are remembered as seen,
    # not pulled; true pulls them too (within the filters).
    backfill: bool = False

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.upper() for v in value)


class SourceSettings(DicomPeer):
    """An archive pacs-agent pulls studies from (`pacs-agent submit`, the poller) and asks how
    many instances a study has (completeness by count): a DICOMweb server (QIDO-RS, WADO-RS)
    or a DICOM peer (`dimse`: C-FIND, C-GET)."""

    role: ClassVar[str] = "source"
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    # dimse: `timeout_seconds` bounds each reply of the archive.
    kind: Literal["dicomweb", "dimse"] = "dicomweb"
    # Senders whose pushes this source can confirm: it holds every study they send us too.
    calling_ae_titles: tuple[AeTitle, ...] = ()
    poll: SourcePoll | None = None


class WebTls(ReceiverTls):
    """HTTPS on the web port: its certificate and key, and optionally the CAs of client
    certificates (as [receiver.tls]; TLS 1.2 or later)."""


class WebUser(_Section):
    """One HTTP Basic user (RFC 7617): the name, and where its password is kept."""

    # RFC 7617 2: the user-id cannot contain a colon.
    username: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^:\x00-\x1f]+$")]
    password: SecretRef


class WebSettings(_Section):
    """The HTTP port: STOW-RS ingest (/dicom-web), the JSON API (/api) and health."""

    # On by default, on loopback only: the health and status API for this host, and a STOW-RS
    # door that refuses everyone until tokens or users are configured.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # With a [web.tls] table the port speaks HTTPS only.
    tls: WebTls | None = None
    # Bearer tokens accepted (RFC 6750), each from a file or an environment variable.
    tokens: tuple[SecretRef, ...] = ()
    # HTTP Basic users (RFC 7617); use them over TLS only, the password travels in every request.
    users: tuple[WebUser, ...] = ()
    # Requests without credentials are served; with neither tokens nor users nor this, every
    # request but /api/health is refused with 401.
    allow_anonymous: bool = False
    # Largest STOW-RS request body; a larger one is refused with 413. Each instance in it is
    # also held to [receiver] max_instance_bytes. Unset: no limit beyond that one.
    max_request_bytes: Annotated[int, Field(ge=1)] | None = None

    @field_validator("users")
    @classmethod
    def _unique_users(cls, value: tuple[WebUser, ...]) -> tuple[WebUser, ...]:
        names = [user.username for user in value]
        if len(set(names)) != len(names):
            raise ValueError("user names must be unique")
        return value


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    # The audit trail (agent.audit): one JSON line per association, per association's instances,
    # per export, per start and stop. Unset: audit.log beside the spool; "" turns it off.
    audit_file: str | None = None


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
