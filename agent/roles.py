"""The long-running roles: `serve` (receiver, assembler, web port, embedded worker) and
`worker`, between the audit trail's start and stop records."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from agent import audit
from agent.db.database import Database
from agent.errors import AgentError, ConfigError
from agent.settings import Settings
from agent.settings.locate import ConfigSource
from agent.spool.layout import SpoolLayout

if TYPE_CHECKING:  # the heavy modules (torch, highdicom, celery) load only for the roles using them
    from celery import Celery

    from agent.db.values import SenderNews
    from agent.pipeline import PipelineContext
    from agent.pull.service import Pulls
    from agent.spool.watermark import Watermark
    from agent.web.server import WebServer

from agent.cli_exits import EXIT_FAILURE, EXIT_OK

log = logging.getLogger(__name__)


def _context(settings: Settings) -> PipelineContext:
    from agent.pipeline import PipelineContext

    layout = SpoolLayout(settings.spool.path)
    layout.create()
    db = Database(settings.database_url)
    db.create_schema()
    return PipelineContext(settings, db, layout)


def _run_worker(app: Celery, settings: Settings, queues: list[str], name: str) -> None:
    """Run a Celery worker in this thread until SIGTERM/SIGINT (warm shutdown; a second SIGINT
    is a cold one, which interrupts the running task without ending its study)."""
    from agent.queue.pool import SoloPool

    worker = app.Worker(
        pool=SoloPool,  # one process per GPU: the model stays loaded between tasks
        concurrency=1,
        queues=queues,
        hostname=f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}",
        loglevel=settings.logging.level,
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=settings.queue.embedded,
        quiet=True,
    )
    worker.start()


def _warm_decoders() -> None:
    """Start the pixel-decoding processes now, not in the first study's inference time."""
    from agent.inference.decode_pool import warm_pool

    warm_pool()


def cmd_serve(settings: Settings, config: str = "built-in defaults") -> int:
    from agent.assembly.assembler import Assembler
    from agent.assembly.policy import SystemClock
    from agent.inference.registry import preload, with_package_rules
    from agent.queue.app import create_app, enqueuer
    from agent.queue.routing import consumed_queues
    from agent.receive.scp import start_receiver
    from agent.spool.retention import RetentionSweeper
    from agent.spool.watermark import Watermark
    from agent.web.limits import raise_open_files_limit

    raise_open_files_limit()  # before the receiver and the web port open their sockets
    ctx = _context(settings)
    app = create_app(settings, lambda: ctx)
    from agent.pull.service import Pulls

    pulls = Pulls(settings, ctx.db, ctx.layout)
    assembler = Assembler(
        ctx.db,
        ctx.layout,
        quiet_seconds=settings.study.quiet_seconds,
        models=with_package_rules(settings.models),
        enqueue=enqueuer(app),
        clock=SystemClock(),
        stale_after=settings.queue.stale_after,
        counts=pulls.counts(),
        verify_after=settings.study.verify_after_seconds,
        urgent_senders=settings.queue.urgent_senders,
        sender_retry_seconds=settings.study.sender_retry_seconds,
        max_wait_seconds=settings.study.max_wait_seconds,
        max_instance_bytes=settings.receiver.max_instance_bytes,
    )
    assembler.resume(requeue_in_flight=settings.queue.embedded)
    watermark = Watermark.from_settings(settings.spool)
    try:
        server = start_receiver(settings.receiver, ctx.layout, assembler.submit, watermark)
    except OSError as exc:
        ctx.db.dispose()
        where = f"{settings.receiver.host}:{settings.receiver.port}"
        raise AgentError(f"receiver cannot listen on {where}: {exc.strerror}") from exc
    web = _start_web(settings, ctx, assembler.submit, watermark, server.shutdown, pulls)
    assembler.start()
    sweeper = RetentionSweeper(ctx.db, ctx.layout, retention_days=settings.spool.retention_days)
    sweeper.start()
    pollers = pulls.pollers()
    for poller in pollers:
        poller.start()
    try:
        if settings.queue.embedded:
            log.info("embedded worker on the in-memory broker")
            _warm_decoders()  # the receiver is already listening
            devices = preload(settings.models)
            _started(settings, config, server.server_address[1], web, devices)
            _run_worker(app, settings, consumed_queues("all"), "serve")
        else:
            _started(settings, config, server.server_address[1], web, None)
            _wait_for_signal()
    finally:
        for poller in pollers:
            poller.stop()
        if web is not None:
            web.stop()
        server.shutdown()
        sweeper.stop()
        assembler.stop()
        ctx.db.dispose()
        log.info("stopped")
    return EXIT_OK


def _started(
    settings: Settings,
    config: str,
    port: int,
    web: WebServer | None,
    devices: dict[str, str] | None,
) -> None:
    """The end of the start-up, in one line: the configuration it read, where it listens,
    which model runs where (None: on separate workers), where results go; and a warning
    when they go nowhere. (A start that fails says only why, in one line.)"""
    if not settings.destinations:
        log.warning(
            "no [[destinations]] configured: results are kept in the outbox and sent nowhere"
        )
    listening = f"receiver {settings.receiver.ae_title} on {settings.receiver.host}:{port}"
    if web is not None:
        listening += f", web on {settings.web.host}:{web.port}"
    names = [m.name for m in settings.models]
    if devices is None:
        models = ", ".join(names) + " (run by separate workers)"
    else:
        models = ", ".join(f"{name} on {devices.get(name, 'not loaded')}" for name in names)
    sent = ", ".join(d.name for d in settings.destinations) or "none"
    log.info(
        "started: configuration %s; %s; models %s; destinations %s",
        config,
        listening,
        models,
        sent,
    )


def _start_web(
    settings: Settings,
    ctx: PipelineContext,
    sink: Callable[[SenderNews], None],
    watermark: Watermark,
    stop_receiver: Callable[[], None],
    pulls: Pulls,
) -> WebServer | None:
    """The [web] port, when enabled, with STOW-RS arrivals going where the receiver's go."""
    if not settings.web.enabled:
        return None
    from agent.web.app import WebServices
    from agent.web.server import start_web

    services = WebServices(settings, ctx.layout, ctx.db, sink, watermark, pulls)
    try:
        return start_web(services)
    except OSError as exc:
        stop_receiver()
        ctx.db.dispose()
        where = f"{settings.web.host}:{settings.web.port}"
        raise AgentError(f"web port cannot listen on {where}: {exc.strerror or exc}") from exc
    except BaseException:
        stop_receiver()
        ctx.db.dispose()
        raise


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()


def with_device(settings: Settings, device: str | None) -> Settings:
    """The settings with `device` for every model whose device is "auto": one worker per GPU
    on a host with several (`--device cuda:1`), from one configuration file."""
    if device is None:
        return settings
    models = tuple(
        m.model_copy(update={"device": device}) if m.device == "auto" else m
        for m in settings.models
    )
    return settings.model_copy(update={"models": models})


def cmd_worker(settings: Settings, queue: str, device: str | None = None, config: str = "") -> int:
    if settings.queue.embedded:
        raise ConfigError(
            "[queue] broker_url is memory://: the in-memory broker only works inside "
            "`pacs-agent serve`; set broker_url to redis://... for separate workers"
        )
    from agent.queue.app import create_app
    from agent.queue.routing import consumed_queues

    settings = with_device(settings, device)
    ctx = _context(settings)
    app = create_app(settings, lambda: ctx)
    queues = consumed_queues(queue)  # each urgent queue with its normal one
    if "gpu" in queues:
        from agent.inference.registry import preload

        _warm_decoders()
        preload(settings.models)
    log.info("configuration: %s", config)
    _run_worker(app, settings, queues, f"worker-{queue}")
    return EXIT_OK


def run_role(settings: Settings, args: argparse.Namespace, source: ConfigSource) -> int:
    """Run `serve` or `worker` between the audit trail's start and stop records.

    The start record names the configuration file (none: the built-in defaults) and its
    SHA-256, never its contents (it may hold secrets). One-shot commands (status, echo, ...)
    keep no audit trail.
    """
    role: str = args.command
    path = source.path
    config = source.describe()
    audit.configure_audit(settings)
    audit.config_loaded(path, audit.file_digest(path) if path else None, role=role)
    code, reason = EXIT_FAILURE, None
    try:
        code = (
            cmd_serve(settings, config)
            if role == "serve"
            else cmd_worker(settings, args.queue, args.device, config)
        )
    except AgentError as exc:
        reason = str(exc)
        raise
    finally:
        audit.application_stopped(role, ok=code == EXIT_OK, reason=reason)
    return code
