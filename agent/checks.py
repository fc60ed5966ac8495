"""`check-config` and `echo`: what the service needs, tested without starting it (and
without creating anything it would create), and one destination asked if it answers."""

from __future__ import annotations

import errno
import functools
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from agent.cli_exits import EXIT_FAILURE, EXIT_OK
from agent.db.database import Database
from agent.db.existing import display_url, sqlite_file
from agent.errors import AgentError, ConfigError
from agent.settings import DestinationSettings, ModelSettings, Settings
from agent.settings.locate import ConfigSource
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic


def _check(name: str, action: Callable[[], str | None]) -> bool:
    """Run one check and print its line: "ok    NAME[: note]" or "FAIL  NAME: why"."""
    try:
        note = action()
    except Exception as exc:  # the CLI boundary: report, do not crash
        print(f"FAIL  {name}: {exc}")
        return False
    print(f"ok    {name}" + (f": {note}" if note else ""))
    return True


def _would_create(path: Path) -> str:
    """For a folder or file that does not exist yet: where `serve` would create it, if it
    can; check-config itself creates nothing."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AgentError(f"does not exist, and {parent} is not writable to create it")
    return "does not exist yet; `serve` creates it"


def _port_free(what: str, host: str, port: int) -> bool:
    """Whether the port can be bound (as the listener binds it), told in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"FAIL  {what} port {port} is in use (on {host})")
        else:
            print(f"FAIL  {what} port {port} cannot be bound on {host}: {exc.strerror or exc}")
        return False
    print(f"ok    {what} port {port} on {host} is free")
    return True


def cmd_check_config(settings: Settings, source: ConfigSource) -> int:
    """Validate the configuration and test what the service needs, creating nothing: no
    spool folder, no database file or table (`serve` creates those at its start)."""
    layout = SpoolLayout(settings.spool.path)
    url = settings.database_url

    def spool() -> str | None:
        root = settings.spool.path
        if not root.exists():
            return _would_create(root)
        if not root.is_dir():
            raise AgentError("not a folder")
        # A durable write (and its rename) where the service writes: spool/tmp once it exists.
        folder = layout.tmp if layout.tmp.is_dir() else root
        probe = folder / f".probe-{uuid.uuid4().hex}"
        write_atomic(probe, [b"probe"], folder)
        probe.unlink()
        return None

    def database() -> str | None:
        path = sqlite_file(url)
        if path is not None and not path.exists():
            return _would_create(path)
        db = Database(url)
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                if not inspect(conn).has_table("study"):
                    return "no tables yet; `serve` creates them"
        except SQLAlchemyError as exc:  # the driver's own words, first line only
            raise AgentError(
                str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            ) from exc
        finally:
            db.dispose()
        return None

    def broker() -> None:
        if settings.queue.embedded:
            return
        from celery import Celery

        app = Celery("pacs_agent_check", broker=settings.queue.broker_url, set_as_current=False)
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)

    def receiver_tls() -> None:
        from agent.tls import server_context

        if settings.receiver.tls is not None:
            server_context(settings.receiver.tls)

    def web_port() -> None:
        from agent.tls import server_context
        from agent.web.auth import Authenticator

        if settings.web.tls is not None:
            server_context(settings.web.tls)
        Authenticator.from_settings(settings.web)

    print(f"ok    configuration: {source.describe()}")
    results = [
        _check(f"spool {settings.spool.path}", spool),
        _check(f"database {display_url(url)}", database),
        _check(f"broker {settings.queue.broker_url.split('://')[0]}://", broker),
        _port_free("receiver", settings.receiver.host, settings.receiver.port),
    ]
    if settings.receiver.tls is not None:
        results.append(_check("receiver TLS certificate, key and CA", receiver_tls))
    if settings.web.enabled:
        results.append(_port_free("web", settings.web.host, settings.web.port))
        results.append(_check("web port certificate, key, tokens and passwords", web_port))
    for model in settings.models:
        results.append(_check(f"model {model.name}", _model_check(model)))
    for dest in settings.destinations:
        results.append(
            _check(
                f"destination {dest.name} ({_where(dest)}) {_probe_name(dest)}",
                functools.partial(_probe, dest, settings.receiver.ae_title),
            )
        )
    return EXIT_OK if all(results) else EXIT_FAILURE


def _model_check(model: ModelSettings) -> Callable[[], None]:
    # Loads the package as a worker would (manifest, SHA-256, network); runs nothing.
    from agent.inference.registry import get_model

    def check() -> None:
        get_model(model.name, model.package, model.precision)

    return check


def cmd_echo(settings: Settings, name: str) -> int:

    dest = next((d for d in settings.destinations if d.name == name), None)
    if dest is None:
        known = ", ".join(d.name for d in settings.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} (known: {known})")
    _probe(dest, settings.receiver.ae_title)
    print(f"{_probe_name(dest)} {dest.name} ({_where(dest)}): success")
    return EXIT_OK


def _where(dest: DestinationSettings) -> str:
    if dest.kind == "dicomweb":
        return dest.url or ""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _probe_name(dest: DestinationSettings) -> str:
    return "QIDO-RS" if dest.kind == "dicomweb" else "C-ECHO"


def _probe(dest: DestinationSettings, calling_ae: str) -> None:
    """C-ECHO a DICOM peer; ask a DICOMweb server for one study (reachable, credentials good)."""
    from agent.export import dimse, stow

    if dest.kind == "dicomweb":
        stow.check(dest)
    else:
        dimse.echo(dest, calling_ae)
