"""The readable end-to-end flow a task calls: infer on the selected series, encode, export."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydicom.dataset import Dataset

from agent.db.database import Database, utcnow
from agent.db.deliveries import Deliveries
from agent.db.stamps import ResultStamps
from agent.db.states import TERMINAL, InvalidTransition, State, Superseded
from agent.db.switches import ModelSwitches, held, in_state, switched_off
from agent.dicom.files import read_header
from agent.dicom.uids import SegType, output_uids
from agent.domain import FrameRef, Manifest, Priority
from agent.encode.seg import build_seg, segments_overlap
from agent.encode.sr import build_sr
from agent.errors import JobHeld, PermanentError, RetryableError, StudySkipped
from agent.export.outbox import Outbox, Report
from agent.inference.registry import Model, get_model
from agent.inference.runner import resolve_device, run_model
from agent.inference.volume import Volume, load_volume
from agent.logs import log_context, study_key
from agent.results import ModelResult, has_result, load_result, save_result
from agent.settings import Settings
from agent.space import disk_space
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9901


@dataclass(frozen=True)
class PipelineContext:
    settings: Settings
    db: Database
    layout: SpoolLayout


def _manifest(ctx: PipelineContext, job_id: str) -> Manifest:
    return Manifest.from_json(ctx.layout.manifest_path(job_id).read_text())


def _current(ctx: PipelineContext, manifest: Manifest) -> str:
    """The study's state, or Superseded if new instances have replaced this job."""
    study = ctx.db.get(manifest.study_uid)
    if study is None or study.job_id != manifest.job_id:
        raise Superseded(f"job {manifest.job_id} is no longer current")
    if study.state in TERMINAL:
        # A duplicate delivery of a finished job (acks_late redelivery, restart re-enqueue).
        raise Superseded(f"job {manifest.job_id} has already ended ({study.state})")
    return study.state


def results_dir(ctx: PipelineContext, job_id: str) -> Path:
    return ctx.layout.job_dir(job_id) / "results"


def _model(ctx: PipelineContext, name: str) -> tuple[Model, torch.device]:
    """The configured model called `name`, loaded (once per process), and its device."""
    entry = next(m for m in ctx.settings.models if m.name == name)
    model = get_model(name, entry.package, entry.precision)
    return model, resolve_device(entry.device, name)


def infer(ctx: PipelineContext, job_id: str) -> Priority:
    """Run every configured model on the job's series and leave the results in the job folder;
    the job's priority, which its export keeps."""
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        out = results_dir(ctx, job_id)
        state = _current(ctx, manifest)
        manifest = _runnable(ctx, manifest)
        if all(has_result(out / m) for m in manifest.models):
            # Redelivered after inference had finished, or retried after a failed export:
            # the results stand (same input, same model); go straight to export.
            if state != State.EXPORTING:
                ctx.db.transition(
                    manifest.study_uid,
                    State.INFERRING,
                    "results already computed",
                    expect_job=job_id,
                )
                ctx.db.transition(
                    manifest.study_uid,
                    State.EXPORTING,
                    "encoding and sending",
                    expect_job=job_id,
                )
            return manifest.priority
        ctx.db.transition(
            manifest.study_uid,
            State.INFERRING,
            expect_job=job_id,
            expect_state=[State.QUEUED, State.INFERRING],
        )
        loaded: dict[tuple[FrameRef, ...], Volume] = {}
        for item in manifest.inputs:
            name = item.model
            if item.frames not in loaded:
                # Models sharing a stack share its volume; one volume at a time otherwise.
                loaded.clear()
                loaded[item.frames] = load_volume(item.frames)
            volume = loaded[item.frames]
            model, device = _model(ctx, name)
            masks, measurements = run_model(model, volume, device)
            with disk_space("results"):
                save_result(
                    out / name,
                    ModelResult(model.identity, model.segments, measurements, masks),
                    ctx.layout.tmp,
                )
            log.info("model %s %s finished", model.identity.name, model.identity.version)
        ctx.db.transition(
            manifest.study_uid, State.EXPORTING, "encoding and sending", expect_job=job_id
        )
        return manifest.priority


def encode(
    ctx: PipelineContext, manifest: Manifest, seg_types: Sequence[SegType] = ("binary",)
) -> dict[SegType, list[Path]]:
    """SEG + SR of every model result in each SEG form of `seg_types`, written once to the
    outbox; same input, same bytes.

    The objects' Content, Instance Creation and Contribution Date/Time say when the result
    was made: the time of its first encoding, recorded in the database, so a retry, a
    re-send after a crash or a repeat of the same input gives the same bytes under the same
    UIDs (PS3.5 9). Each form gets its own SEG and SR (the SR references its SEG), under
    their own UIDs. A result whose segments overlap cannot be a LABELMAP SEG: its BINARY SEG
    and SR stand for it in the "labelmap" list.
    """
    outbox = ctx.layout.job_dir(manifest.job_id) / "outbox"
    files: dict[SegType, list[Path]] = {seg_type: [] for seg_type in seg_types}
    configured = [m.name for m in ctx.settings.models]
    stamps = ResultStamps(ctx.db)
    for item in manifest.inputs:
        # By the model's place in the configuration, so that every revision keeps its numbers.
        index = configured.index(item.model) if item.model in configured else len(configured)
        paths = item.files
        source = [read_header(p) for p in paths]
        sop_uids = [str(ds.SOPInstanceUID) for ds in source]
        position = {path: i for i, path in enumerate(paths)}
        frames = [(position[f.path], f.index) for f in item.frames]
        result = load_result(results_dir(ctx, manifest.job_id) / item.model)
        contents = dict(manifest.contents)
        # The BINARY SEG's UID names the result: each form shares its time.
        result_uid = output_uids(manifest.study_uid, sop_uids, result.model, contents).seg_instance
        series_number = SEG_SERIES_NUMBER + 2 * index
        overlap = "labelmap" in seg_types and segments_overlap(result.masks)
        if overlap:
            log.info("model %s: segments overlap, so LABELMAP destinations get BINARY", item.model)
        for wanted in seg_types:
            seg_type: SegType = "binary" if overlap else wanted
            uids = output_uids(
                manifest.study_uid, sop_uids, result.model, contents, seg_type=seg_type
            )
            seg_path = outbox / f"{uids.seg_instance}.dcm"
            sr_path = outbox / f"{uids.sr_instance}.dcm"
            if not (seg_path.is_file() and sr_path.is_file()):
                made = stamps.made_at(result_uid, utcnow().replace(microsecond=0))
                seg = build_seg(
                    source,
                    result.masks,
                    result.segments,
                    result.model,
                    uids,
                    frames=frames,
                    series_number=series_number,
                    instance_number=manifest.revision,
                    disclaimer=result.model.intended_use,
                    created=made,
                    seg_type=seg_type,
                )
                sr = build_sr(
                    source,
                    seg,
                    result.segments,
                    result.measurements,
                    result.model,
                    uids,
                    series_number=series_number + 1,
                    instance_number=manifest.revision,
                    disclaimer=result.model.intended_use,
                    created=made,
                )
                for ds, path in ((seg, seg_path), (sr, sr_path)):
                    buffer = _encode_file(ds)
                    with disk_space("the outbox"):
                        write_atomic(path, [buffer], ctx.layout.tmp)
            files[wanted] += [seg_path, sr_path]
    return files


def _encode_file(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class ExportPending(RetryableError):
    """Some destination has not stored everything yet; the export runs again in `retry_in` s."""

    def __init__(self, reason: str, retry_in: float) -> None:
        super().__init__(reason)
        self.retry_in = retry_in


class ExportFailed(PermanentError):
    """A destination gave up (its ceiling passed, or it refused an object for good)."""


def export(ctx: PipelineContext, job_id: str) -> None:
    """Encode (once, into the outbox) and deliver the results to every destination.

    Raises ExportPending while a destination is still to be retried, ExportFailed once every
    destination has either stored everything or given up and one gave up.
    """
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        _current(ctx, manifest)
        manifest = _exportable(ctx, manifest)
        destinations = ctx.settings.destinations
        # The forms some destination takes; without destinations, BINARY stays in the outbox.
        seg_types = list(dict.fromkeys(d.seg_type for d in destinations)) or ["binary"]
        encoded = encode(ctx, manifest, seg_types)
        files = encoded[seg_types[0]]
        outbox = Outbox(Deliveries(ctx.db), ctx.settings.receiver.ae_title)
        report = Report()
        for seg_type, objects in encoded.items():
            part = outbox.deliver(
                job_id,
                objects,
                [d for d in destinations if d.seg_type == seg_type],
                study=study_key(manifest.study_uid),
            )
            report = report.merged(part)
        if report.waiting:
            soonest = min(report.waiting, key=lambda w: w.retry_in)
            reasons = [w.reason for w in report.waiting] + report.gave_up
            raise ExportPending("; ".join(reasons), soonest.retry_in)
        if report.gave_up:
            raise ExportFailed("; ".join(report.gave_up))
        order = [d.name for d in destinations]
        names = ", ".join(sorted(report.delivered, key=order.index))
        outcome = (
            f"{len(files)} objects sent to {names}"
            if names
            else f"{len(files)} objects kept in the outbox: no destination configured"
        )
        if report.warnings:
            outcome += " (" + "; ".join(report.warnings) + ")"
        if manifest.note:
            outcome += f"; {manifest.note}"
        ctx.db.transition(
            manifest.study_uid,
            State.DONE,
            outcome,
            expect_job=job_id,
            expect_state=[State.EXPORTING],
        )
        log.info("study done: %s", outcome)


def note_retry(ctx: PipelineContext, job_id: str, state: State, reason: str) -> None:
    """Record (and log) that the job's current step will be tried again, and why."""
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        ctx.db.transition(manifest.study_uid, state, reason, expect_job=job_id)
        log.warning("%s %s", "export" if state == State.EXPORTING else "inference", reason)


def note_waiting(ctx: PipelineContext, job_id: str, state: State, reason: str) -> None:
    """Record that the job's current step waits for a resource (`reason`), once: a step that
    waits for hours is retried every few seconds, and says so once, not once per try."""
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        study = ctx.db.get(manifest.study_uid)
        if study is not None and study.state == state and study.reason == reason:
            return
        ctx.db.transition(manifest.study_uid, state, reason, expect_job=job_id)
        log.warning("%s %s", "export" if state == State.EXPORTING else "inference", reason)


def end(ctx: PipelineContext, job_id: str, state: State, reason: str) -> None:
    """End a job's study as skipped or failed (no-op if the job was superseded).

    Logged once recorded: a database that does not answer raises here, the study is not
    ended, and the log must not say it was.
    """
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        try:
            ctx.db.transition(manifest.study_uid, state, reason, expect_job=job_id)
        except (Superseded, InvalidTransition):
            log.info("job no longer current; its end (%s: %s) is not recorded", state, reason)
            return
        log.warning("study %s: %s", state, reason)


def hold(ctx: PipelineContext, job_id: str, reason: str) -> None:
    """Put a job's study back to queued, waiting for its paused model (`reason`); the assembler
    sends the job again once every model of it is on."""
    manifest = _manifest(ctx, job_id)
    with log_context(study=study_key(manifest.study_uid), job=job_id):
        log.info("study %s", reason)
        try:
            ctx.db.transition(
                manifest.study_uid,
                State.QUEUED,
                reason,
                expect_job=job_id,
                expect_state=[State.QUEUED, State.INFERRING],
            )
        except (Superseded, InvalidTransition):
            log.info("job no longer waiting for inference; not held")


def _runnable(ctx: PipelineContext, manifest: Manifest) -> Manifest:
    """The job as its models' switches allow now: JobHeld while one of them is paused; without
    those switched off, and StudySkipped when that leaves none."""
    states = ModelSwitches(ctx.db).effective(ctx.settings.models)
    paused = in_state(manifest.models, states, "paused")
    if paused:
        raise JobHeld(held(paused))
    off = in_state(manifest.models, states, "off")
    if not off:
        return manifest
    if len(off) == len(manifest.inputs):
        raise StudySkipped("; ".join(switched_off(m) for m in off))
    for name in off:
        log.warning("%s: not run", switched_off(name))
    return replace(manifest, inputs=tuple(i for i in manifest.inputs if i.model not in off))


def _exportable(ctx: PipelineContext, manifest: Manifest) -> Manifest:
    """The job's inputs whose results go out: not those of a model switched off now (its
    results are not sent, even if computed before), nor of one that was off when it ran."""
    states = ModelSwitches(ctx.db).effective(ctx.settings.models)
    out = results_dir(ctx, manifest.job_id)
    off = in_state(manifest.models, states, "off")
    kept = tuple(i for i in manifest.inputs if i.model not in off and has_result(out / i.model))
    if len(kept) == len(manifest.inputs):
        return manifest
    if not kept and off:
        raise StudySkipped("; ".join(switched_off(m) for m in off))
    if not kept:
        raise PermanentError("no model result to export")
    for item in manifest.inputs:
        if item not in kept:
            log.warning("model %s: no result sent (switched off)", item.model)
    return replace(manifest, inputs=kept)
