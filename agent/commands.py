"""The one-shot commands: status, retry, submit, rules test, models (check-config and echo:
agent.checks).

Each answers in a few lines on stdout, or raises an AgentError the CLI turns into one line.
"""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from agent import audit
from agent.cli_exits import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL
from agent.db.database import Database
from agent.db.existing import NoDatabase, open_existing
from agent.domain import Manifest
from agent.errors import AgentError
from agent.settings import ModelSettings, ModelState, Settings
from agent.spool.layout import SpoolLayout

log = logging.getLogger(__name__)


def cmd_status(settings: Settings, limit: int, *, failed: bool = False) -> int:
    from agent.db.states import State

    db = open_existing(settings.database_url)
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
    each destination's answer for each result object. `key` may also be the study's Study
    Instance UID or accession number."""
    from pydicom.uid import UID

    from agent.db.deliveries import Deliveries
    from agent.db.lookup import find_study
    from agent.export.dimse import describe_status
    from agent.export.outbox import object_name

    db = open_existing(settings.database_url)
    try:
        study = find_study(db, key)
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
        error = f"; last error: {delivery.last_error}" if delivery.last_error else ""
        print(
            f"  to {delivery.destination}: {delivery.stored} of {delivery.total} objects stored, "
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

    db = open_existing(settings.database_url)  # nothing to retry in a database made now
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
    from agent.inference.registry import with_package_rules

    limit = settings.receiver.max_instance_bytes
    for line in report(path, with_package_rules(settings.models), limit):
        print(line)
    return EXIT_OK


def cmd_models_list(settings: Settings) -> int:
    from agent.inference.registry import model_names
    from agent.models.package import read_package_manifest

    states = _state_notes(settings)
    code = EXIT_OK
    for model in settings.models:
        state = states[model.name]
        if model.package is not None:
            try:
                manifest = read_package_manifest(model.package)
            except AgentError as exc:
                print(f"FAIL  {model.name}: {exc}{state}")
                code = EXIT_FAILURE
                continue
            info = manifest.model
            package = f"package {info.name} {info.version}, {model.package}"
            print(f"ok    {model.name}: {package}{state}")
        elif model.name in model_names():
            print(f"ok    {model.name}: built-in{state}")
        else:
            print(f"FAIL  {model.name}: no built-in model of this name and no package{state}")
            code = EXIT_FAILURE
    return code


def _state_notes(settings: Settings) -> dict[str, str]:
    """Each model's state as `models list` appends it: "; state on", and for one switched at
    run time, "; state off (switched at run time; configured on)"."""
    from agent.db.switches import ModelSwitches

    try:
        db = open_existing(settings.database_url)
    except NoDatabase as exc:
        # Before the service's first start: no switch can have been set yet.
        print(f"pacs-agent: {exc}: states as configured", file=sys.stderr)
        overrides = {}
    else:
        try:
            overrides = ModelSwitches(db).overrides()
        finally:
            db.dispose()
    return {
        m.name: (
            f"; state {overrides[m.name]} (switched at run time; configured {m.state})"
            if m.name in overrides
            else f"; state {m.state}"
        )
        for m in settings.models
    }


def cmd_models_switch(settings: Settings, name: str, state: ModelState | None) -> int:
    """Switch a model on, paused or off at run time, or (None) back to its configured state.

    The override is kept in the database, where the running service and every worker read it
    at their next decision: a kill switch needs no restart.
    """
    from agent.db.switches import ModelSwitches

    configured = {m.name: m for m in settings.models}
    removed = False
    db = Database(settings.database_url)
    db.create_schema()
    try:
        switches = ModelSwitches(db)
        # An override for a model no longer configured may still be removed.
        if name not in configured and (state is not None or name not in switches.overrides()):
            known = ", ".join(configured)
            raise AgentError(f"no model named {name!r} in the configuration (models: {known})")
        if state is None:
            removed = switches.reset(name)
        else:
            switches.set(name, state)
    finally:
        db.dispose()
    _audit_switch(settings, name, "reset" if state is None else state, configured)
    if name not in configured:
        log.info("override of model %s removed", name)
        print(f"{name}: override removed (the model is not configured)")
    elif state is None:
        now = configured[name].state
        log.info("model %s back to its configured state, %s", name, now)
        print(f"{name}: {now}, as configured" + ("" if removed else " (no override was set)"))
    else:
        log.info("model %s switched %s", name, state)
        print(f"{name}: {state} (configured {configured[name].state}; `models reset` undoes)")
    return EXIT_OK


def _audit_switch(
    settings: Settings, name: str, state: str, configured: Mapping[str, ModelSettings]
) -> None:
    """A switch goes into the audit trail (as a pull does): it is an operator changing what
    the service does with every study, and the trail says who and when."""
    entry = configured.get(name)
    audit.configure_audit(settings)
    try:
        audit.model_switched(
            name,
            state=state,
            configured=entry.state if entry is not None else "not configured",
            by=_os_user(),
        )
    finally:
        audit.close_audit()


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (a bare container)
        return None


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
    found = ", ".join(str(i) for i in result.labels_found) or "none"
    print(f"labels      {found} (given to some voxel of the synthetic volume)")
    if manifest.weights.format == "torchscript":
        print("note        torch deprecates TorchScript: prefer a torch.export program (.pt2)")
    return EXIT_OK
