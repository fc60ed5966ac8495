"""Composition root: parse arguments, load settings, configure logging, run one role or command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agent import __version__
from agent.checks import cmd_check_config, cmd_echo
from agent.cli_exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from agent.commands import (
    cmd_models_check,
    cmd_models_list,
    cmd_models_switch,
    cmd_retry,
    cmd_rules_test,
    cmd_status,
    cmd_study,
    cmd_submit,
)
from agent.db.existing import NoDatabase
from agent.errors import AgentError, ConfigError
from agent.follow import cmd_follow
from agent.logs import configure_logging
from agent.roles import run_role
from agent.settings import ModelState, Settings, load_settings
from agent.settings.locate import ENV_VAR, SYSTEM_CONFIG, ConfigSource, locate_config

# `pacs-agent models VERB NAME`: run-time switches, kept in the database, read without restart.
SWITCHES = {
    "on": "run a model again (an override of its configured state)",
    "pause": "hold a model's new studies, queued, until it is on again",
    "off": "kill switch: do not run a model; its studies are skipped",
    "reset": "remove the override: the configured state applies again",
}
SWITCH_STATES: dict[str, ModelState | None] = {
    "on": "on",
    "pause": "paused",
    "off": "off",
    "reset": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pacs-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool) -> None:
        # `required`: the command needs a configuration file, found one way or another; the
        # built-in defaults would, say, put a kill switch in a database nothing else reads.
        p.add_argument(
            "--config",
            type=Path,
            help=f"TOML configuration file (default: ${ENV_VAR}, else {SYSTEM_CONFIG} "
            "when it exists" + (")" if required else ", else the built-in defaults)"),
        )
        p.set_defaults(config_required=required)

    with_config(
        sub.add_parser("serve", help="receiver + assembler (+ worker with memory://)"), False
    )
    worker = sub.add_parser("worker", help="a Celery worker for scale-out with Redis")
    with_config(worker, True)
    worker.add_argument("--queue", choices=["gpu", "io", "all"], default="all")
    worker.add_argument(
        "--device",
        type=_device,
        help='the GPU of this worker (e.g. cuda:1) for models whose device is "auto"',
    )
    status = sub.add_parser("status", help="recent studies, one line each; or one in detail")
    with_config(status, False)
    status.add_argument("--limit", type=int, default=50)
    status.add_argument("--failed", action="store_true", help="only failed studies, all of them")
    status.add_argument(
        "study",
        nargs="?",
        help="a study key (or its first 6+ characters), Study Instance UID or accession number",
    )
    status.add_argument(
        "--follow",
        action="store_true",
        help="print the study's state changes as they happen, until it ends (exit 0 done, "
        "1 failed or skipped)",
    )
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
    for verb, about in SWITCHES.items():
        # --config required: a kill switch stored in some other database would do nothing.
        switch = models_sub.add_parser(verb, help=about)
        with_config(switch, True)
        switch.add_argument("name", help="the model's name in [[models]]")
    echo = sub.add_parser("echo", help="C-ECHO a configured destination")
    with_config(echo, True)
    echo.add_argument("destination")
    return parser


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", value):
        raise argparse.ArgumentTypeError("cpu, cuda or cuda:N")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status" and args.follow and not args.study:
        parser.error("status --follow needs a study")
    try:
        return _run(args)
    except BrokenPipeError:
        if not _reader_gone():
            raise  # a socket's, not ours to hide
        # The reader has gone (`pacs-agent status | head`): end quietly, and keep the
        # interpreter's own last flush of stdout from failing in its turn.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def _reader_gone() -> bool:
    """Whether stdout is a pipe that its reader has closed: poll(2) reports an error on the
    writing end of a pipe without readers."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout, or one without a descriptor
        return False


def _run(args: argparse.Namespace) -> int:
    source = ConfigSource(None, "defaults")
    try:
        source = locate_config(args.config, os.environ)
        if source.path is None and args.config_required:
            raise ConfigError(
                f"`{_command_name(args)}` needs a configuration file: give --config, set "
                f"{ENV_VAR} or install {SYSTEM_CONFIG}"
            )
        try:
            settings = load_settings(source.path)
        except ConfigError as exc:
            if source.via != ENV_VAR:
                raise
            raise ConfigError(f"{exc} (the file ${ENV_VAR} names)") from exc
        configure_logging(settings.logging.level, settings.logging.format)
        if args.command not in ("serve", "worker"):
            # One-shot commands answer in one line; pynetdicom's own error lines would repeat it.
            logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        code = _dispatch(settings, args, source)
        sys.stdout.flush()  # here, where a reader gone is still caught
        return code
    except ConfigError as exc:
        print(f"pacs-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NoDatabase as exc:
        print(f"pacs-agent: {exc} (configuration: {source.describe()})", file=sys.stderr)
        return EXIT_FAILURE
    except AgentError as exc:
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"pacs-agent: database unavailable: {detail}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(settings: Settings, args: argparse.Namespace, source: ConfigSource) -> int:
    if args.command in ("serve", "worker"):
        return run_role(settings, args, source)
    if args.command == "status":
        if args.follow:
            return cmd_follow(settings, args.study)
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
        if args.models_command in SWITCHES:
            return cmd_models_switch(settings, args.name, SWITCH_STATES[args.models_command])
        return cmd_models_check(args.path)
    if args.command == "check-config":
        return cmd_check_config(settings, source)
    return cmd_echo(settings, args.destination)


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "models_command", None) or getattr(args, "rules_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


if __name__ == "__main__":
    sys.exit(main())
