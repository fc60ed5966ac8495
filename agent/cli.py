"""Composition root: parse arguments, load settings, configure logging, run one role."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from agent import audit
from agent.db.database import Database
from agent.domain import Manifest
from agent.errors import AgentError, ConfigError
from agent.logs import configure_logging
from agent.settings import DestinationSettings, Settings, load_settings
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic

if TYPE_CHECKING:  # the heavy modules (torch, highdicom, celery) load only for the roles using them
    from celery import Celery

    from agent.db.values import ArrivedInstance
    from agent.pipeline import PipelineContext
    from agent.spool.watermark import Watermark
    from agent.web.server import WebServer

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# sysexits.h EX_TEMPFAIL: a source or the spool is unavailable now; the same command may work later.
EXIT_TEMPFAIL = 75


def _context(settings: Settings) -> PipelineContext:
    from agent.pipeline import PipelineContext

    layout = SpoolLayout(settings.spool.path)
    layout.create()
    db = Database(settings.database_url)
    db.create_schema()
    return PipelineContext(settings, db, layout)


def _run_worker(app: Celery, settings: Settings, queues: list[str], name: str) -> None:
    """Run a Celery worker in this thread until SIGTERM/SIGINT (warm shutdown)."""
    worker = app.Worker(
        pool="solo",  # one process per GPU: the model stays loaded between tasks
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


def cmd_serve(settings: Settings) -> int:
    from agent.assembly.assembler import Assembler
    from agent.assembly.policy import SystemClock
    from agent.queue.app import create_app, enqueuer
    from agent.receive.scp import start_receiver
    from agent.spool.retention import RetentionSweeper
    from agent.spool.watermark import Watermark

    ctx = _context(settings)
    app = create_app(settings, lambda: ctx)
    from agent.pull.service import Pulls

    pulls = Pulls(settings, ctx.db, ctx.layout)
    assembler = Assembler(
        ctx.db,
        ctx.layout,
        quiet_seconds=settings.study.quiet_seconds,
        models=settings.models,
        enqueue=enqueuer(app),
        clock=SystemClock(),
        stale_after=settings.queue.stale_after,
        counts=pulls.counts(),
        verify_after=settings.study.verify_after_seconds,
    )
    assembler.resume(requeue_in_flight=settings.queue.embedded)
    watermark = Watermark.from_settings(settings.spool)
    try:
        server = start_receiver(settings.receiver, ctx.layout, assembler.submit, watermark)
    except OSError as exc:
        ctx.db.dispose()
        where = f"{settings.receiver.host}:{settings.receiver.port}"
        raise AgentError(f"receiver cannot listen on {where}: {exc.strerror}") from exc
    web = _start_web(settings, ctx, assembler.submit, watermark, server.shutdown)
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
            _run_worker(app, settings, ["gpu", "io"], "serve")
        else:
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


def _start_web(
    settings: Settings,
    ctx: PipelineContext,
    sink: Callable[[ArrivedInstance], None],
    watermark: Watermark,
    stop_receiver: Callable[[], None],
) -> WebServer | None:
    """The [web] port, when enabled, with STOW-RS arrivals going where the receiver's go."""
    if not settings.web.enabled:
        return None
    from agent.web.app import WebServices
    from agent.web.server import start_web

    services = WebServices(settings, ctx.layout, ctx.db, sink, watermark)
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


def cmd_worker(settings: Settings, queue: str) -> int:
    if settings.queue.embedded:
        raise ConfigError(
            "[queue] broker_url is memory://: the in-memory broker only works inside "
            "`pacs-agent serve`; set broker_url to redis://... for separate workers"
        )
    from agent.queue.app import create_app

    ctx = _context(settings)
    app = create_app(settings, lambda: ctx)
    queues = ["gpu", "io"] if queue == "all" else [queue]
    if "gpu" in queues:
        _warm_decoders()
    _run_worker(app, settings, queues, f"worker-{queue}")
    return EXIT_OK


def cmd_status(settings: Settings, limit: int, *, failed: bool = False) -> int:
    from agent.db.states import State

    db = Database(settings.database_url)
    db.create_schema()
    try:
        rows = (
            [db.status(st) for st in db.in_states([State.FAILED])] if failed else db.recent(limit)
        )
    finally:
        db.dispose()
    if not rows:
        print("no failed studies" if failed else "no studies yet")
    for row in rows:
        stages = " ".join(f"{state}={at.strftime('%H:%M:%S')}" for state, at in row.stages)
        reason = f" ({row.reason})" if row.reason else ""
        print(f"{row.study_key}  {row.state}{reason}  {row.instance_count} instances  {stages}")
    return EXIT_OK


def cmd_study(settings: Settings, key: str) -> int:
    """One study in detail: its stages, every series stored with what each was used for, and
    each destination's answer for each result object."""
    from pydicom.uid import UID

    from agent.db.deliveries import Deliveries
    from agent.export.dimse import describe_status
    from agent.export.outbox import object_name

    db = Database(settings.database_url)
    db.create_schema()
    try:
        study = db.by_key(key)
        if study is None:
            raise AgentError(f"no single study with key {key!r} (give at least 6 characters)")
        row = db.status(study)
        contents = db.series_contents(study.id)
        deliveries = Deliveries(db).of_job(study.job_id) if study.job_id else []
    finally:
        db.dispose()
    reason = f" ({study.reason})" if study.reason else ""
    print(f"{study.study_key}  {study.state}{reason}  revision {study.revision}")
    for state, at in row.stages:
        print(f"  {at.strftime('%Y-%m-%d %H:%M:%S')}Z  {state}")
    used: dict[str, list[str]] = {}
    manifest_path = SpoolLayout(settings.spool.path).manifest_path(study.job_id or "-")
    if study.job_id and manifest_path.is_file():
        for item in Manifest.from_json(manifest_path.read_text()).inputs:
            used.setdefault(item.series_uid, []).append(item.model)
    for series_uid, sop_class, count in contents:
        name = UID(sop_class).name if sop_class else "no SOP class"
        folder = SpoolLayout.series_folder(series_uid)
        role = f"input of {', '.join(used[series_uid])}" if series_uid in used else "stored"
        print(f"  series {folder}  {count} x {name}  {role}")
    for delivery in deliveries:
        stored = sum(o.stored for o in delivery.objects)
        error = f"; last error: {delivery.last_error}" if delivery.last_error else ""
        print(
            f"  to {delivery.destination}: {stored} of {len(delivery.objects)} stored, "
            f"{delivery.attempts} attempt{'' if delivery.attempts == 1 else 's'} since "
            f"{delivery.first_attempt_at.strftime('%Y-%m-%d %H:%M:%S')}Z{error}"
        )
        for o in delivery.objects:
            comment = f"  {o.comment}" if o.comment else ""
            print(f"    {object_name(o.sop_class_uid)}  {describe_status(o.status)}{comment}")
    return EXIT_OK


def cmd_retry(settings: Settings, key: str | None, all_failed: bool) -> int:
    """Queue failed studies again (their results and outbox are reused), or re-assemble one
    that was skipped or failed before it had a job; the running service picks them up."""
    from agent.assembly.assembler import RETRY_REQUESTED
    from agent.db.deliveries import Deliveries
    from agent.db.states import State

    db = Database(settings.database_url)
    db.create_schema()
    layout = SpoolLayout(settings.spool.path)
    try:
        if all_failed:
            studies = db.in_states([State.FAILED])
        else:
            study = db.by_key(key or "")
            if study is None:
                raise AgentError(f"no single study with key {key!r} (give at least 6 characters)")
            if study.state not in (State.FAILED, State.SKIPPED):
                raise AgentError(
                    f"study {study.study_key} is {study.state}; only failed or skipped "
                    "studies are retried"
                )
            studies = [study]
        for study in studies:
            job = study.job_id
            if study.state == State.FAILED and job and layout.manifest_path(job).is_file():
                Deliveries(db).restart(job)
                db.transition(
                    study.study_uid,
                    State.QUEUED,
                    f"{RETRY_REQUESTED} (was: {study.reason})"[:2000],
                    expect_job=job,
                    expect_state=[State.FAILED],
                )
                print(f"{study.study_key}  queued again")
            else:
                db.transition(
                    study.study_uid,
                    State.RECEIVING,
                    f"{RETRY_REQUESTED}: assembled again",
                    expect_state=[State(study.state)],
                )
                print(f"{study.study_key}  to be assembled again")
        if not studies:
            print("no failed studies")
    finally:
        db.dispose()
    return EXIT_OK


def cmd_submit(settings: Settings, study_uid: str, source: str | None) -> int:
    """Pull a study from a source into the spool and the database; the running service (or
    the next one to start) processes it, as it would a study pushed to it."""
    from agent.pull.service import Pulls
    from agent.pull.source import SourceUnavailable

    layout = SpoolLayout(settings.spool.path)
    layout.create()
    db = Database(settings.database_url)
    db.create_schema()
    audit.configure_audit(settings)
    try:
        result = Pulls(settings, db, layout).pull(study_uid, source)
    except SourceUnavailable as exc:
        print(f"pacs-agent: {exc}; try again later", file=sys.stderr)
        return EXIT_TEMPFAIL
    finally:
        db.dispose()
        audit.close_audit()
    refused = f", {result.refused} refused" if result.refused else ""
    print(
        f"{result.study_key}  pulled {result.stored} instances from {result.source}{refused}; "
        "`pacs-agent serve` processes it"
    )
    return EXIT_OK


def cmd_rules_test(settings: Settings, path: Path) -> int:
    from agent.assembly.explain import report

    for line in report(path, settings.models):
        print(line)
    return EXIT_OK


def cmd_models_list(settings: Settings) -> int:
    from agent.inference.registry import model_names
    from agent.models.package import read_package_manifest

    code = EXIT_OK
    for model in settings.models:
        if model.package is not None:
            try:
                manifest = read_package_manifest(model.package)
            except AgentError as exc:
                print(f"FAIL  {model.name}: {exc}")
                code = EXIT_FAILURE
                continue
            info = manifest.model
            print(f"ok    {model.name}: package {info.name} {info.version}, {model.package}")
        elif model.name in model_names():
            print(f"ok    {model.name}: built-in")
        else:
            print(f"FAIL  {model.name}: no built-in model of this name and no package")
            code = EXIT_FAILURE
    return code


def cmd_models_check(path: Path) -> int:
    from agent.models.check import check_package
    from agent.models.package import load_package

    package = load_package(path)
    manifest = package.manifest
    result = check_package(package)
    z, y, x = result.shape
    outputs = ", ".join(f"{o.index} {o.label}" for o in manifest.outputs)
    print(f"name        {manifest.model.name}")
    print(f"version     {manifest.model.version}")
    print(f"weights     {manifest.weights.file} ({manifest.weights.format})")
    print(f"sha256      {package.weights_sha256}")
    print(f"device uid  {package.identity.device_uid}")
    print(f"outputs     {outputs}")
    print(f"run         {result.seconds:.2f} s for a {z}x{y}x{x} synthetic volume on cpu")
    if manifest.weights.format == "torchscript":
        print("note        torch deprecates TorchScript: prefer a torch.export program (.pt2)")
    return EXIT_OK


def _check(name: str, action: object) -> bool:
    try:
        action()  # type: ignore[operator]
    except Exception as exc:  # the CLI boundary: report, do not crash
        print(f"FAIL  {name}: {exc}")
        return False
    print(f"ok    {name}")
    return True


def cmd_check_config(settings: Settings) -> int:
    layout = SpoolLayout(settings.spool.path)

    def spool() -> None:
        layout.create()
        probe = layout.tmp / f"probe-{uuid.uuid4().hex}"
        write_atomic(probe, [b"probe"], layout.tmp)
        probe.unlink()

    def database() -> None:
        db = Database(settings.database_url)
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            db.dispose()

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

    results = [
        _check(f"spool {settings.spool.path}", spool),
        _check("database", database),
        _check(f"broker {settings.queue.broker_url.split('://')[0]}://", broker),
    ]
    if settings.receiver.tls is not None:
        results.append(_check("receiver TLS certificate, key and CA", receiver_tls))
    if settings.web.enabled:
        results.append(_check("web port certificate, key, tokens and passwords", web_port))
    for dest in settings.destinations:
        results.append(
            _check(
                f"destination {dest.name} ({_where(dest)}) {_probe_name(dest)}",
                lambda d=dest: _probe(d, settings.receiver.ae_title),
            )
        )
    return EXIT_OK if all(results) else EXIT_FAILURE


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


def run_role(settings: Settings, args: argparse.Namespace) -> int:
    """Run `serve` or `worker` between the audit trail's start and stop records.

    The start record names the configuration file and its SHA-256, never its contents (it may
    hold secrets). One-shot commands (status, echo, ...) keep no audit trail.
    """
    role: str = args.command
    audit.configure_audit(settings)
    path: Path | None = args.config
    audit.config_loaded(path, audit.file_digest(path) if path else None, role=role)
    code, reason = EXIT_FAILURE, None
    try:
        code = cmd_serve(settings) if role == "serve" else cmd_worker(settings, args.queue)
    except AgentError as exc:
        reason = str(exc)
        raise
    finally:
        audit.application_stopped(role, ok=code == EXIT_OK, reason=reason)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--config",
            type=Path,
            required=required,
            help="TOML configuration file" + ("" if required else " (default: embedded defaults)"),
        )

    with_config(
        sub.add_parser("serve", help="receiver + assembler (+ worker with memory://)"), False
    )
    worker = sub.add_parser("worker", help="a Celery worker for scale-out with Redis")
    with_config(worker, True)
    worker.add_argument("--queue", choices=["gpu", "io", "all"], default="all")
    status = sub.add_parser("status", help="recent studies, one line each; or one in detail")
    with_config(status, False)
    status.add_argument("--limit", type=int, default=50)
    status.add_argument("--failed", action="store_true", help="only failed studies, all of them")
    status.add_argument("study", nargs="?", help="a study key (or its first 6+ characters)")
    rules = sub.add_parser("rules", help="series selection rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_sub.add_parser(
        "test", help="which model would take each series of a file or folder, and why not"
    )
    with_config(rules_test, False)
    rules_test.add_argument("path", type=Path, help="a DICOM file or a folder (searched deeply)")
    with_config(sub.add_parser("check-config", help="validate and test reachability"), False)
    retry = sub.add_parser("retry", help="queue a failed (or skipped) study again")
    with_config(retry, False)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("study", nargs="?", help="a study key (or its first 6+ characters)")
    which.add_argument("--all-failed", action="store_true", help="every failed study")
    submit = sub.add_parser("submit", help="pull a study from a [[sources]] archive and process it")
    with_config(submit, True)
    submit.add_argument("--study", required=True, help="the StudyInstanceUID")
    submit.add_argument(
        "--from", dest="source", help="the source's name (default: the only one configured)"
    )
    models = sub.add_parser("models", help="segmentation models and model packages")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    with_config(models_sub.add_parser("list", help="the configured models"), False)
    models_check = models_sub.add_parser(
        "check", help="validate a model package and run it once on a synthetic volume"
    )
    with_config(models_check, False)
    models_check.add_argument("path", type=Path, help="a package folder, .zip or .tar")
    echo = sub.add_parser("echo", help="C-ECHO a configured destination")
    with_config(echo, True)
    echo.add_argument("destination")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure_logging(settings.logging.level, settings.logging.format)
        if args.command not in ("serve", "worker"):
            # One-shot commands answer in one line; pynetdicom's own error lines would repeat it.
            logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        if args.command in ("serve", "worker"):
            return run_role(settings, args)
        if args.command == "status":
            if args.study:
                return cmd_study(settings, args.study)
            return cmd_status(settings, args.limit, failed=args.failed)
        if args.command == "rules":
            return cmd_rules_test(settings, args.path)
        if args.command == "retry":
            return cmd_retry(settings, args.study, args.all_failed)
        if args.command == "submit":
            return cmd_submit(settings, args.study, args.source)
        if args.command == "models":
            if args.models_command == "list":
                return cmd_models_list(settings)
            return cmd_models_check(args.path)
        if args.command == "check-config":
            return cmd_check_config(settings)
        return cmd_echo(settings, args.destination)
    except ConfigError as exc:
        print(f"pacs-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"pacs-agent: database unavailable: {detail}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
