"""The systems pacs-agent calls: destinations and sources, by DIMSE or DICOMweb, TLS and auth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from agent.settings.base import AeTitle, Pattern, Port, SecretRef, _Section


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
    # The SEG form it takes (PS3.3 C.8.20.2): "binary" (Segmentation Storage, which every
    # SEG-aware archive takes) or "labelmap" (Label Map Segmentation Storage: far fewer
    # frames, what current viewers prefer; Orthanc 1.10 refuses it). The SR sent with it
    # references that SEG.
    seg_type: Literal["binary", "labelmap"] = "binary"
    # dimse: `timeout_seconds` bounds the connection (10 s at most), the answer to the
    # association request (30 s at most) and each C-STORE response.
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
