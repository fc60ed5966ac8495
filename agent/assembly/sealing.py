"""Sealing a study: complete, then its job built (inputs, digest, revision, manifest) and queued.

Or, when no model takes it, skipped; or, when its input is the one whose results were already
sent, done again. Sending the queued job (or holding it for a paused model) is the assembler's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from agent.assembly.admission import study_priority, without_switched_off
from agent.assembly.counts import study_sender
from agent.assembly.policy import PARTIAL
from agent.assembly.rules import select
from agent.db.database import Database
from agent.db.schema import Study
from agent.db.states import State
from agent.db.switches import ModelSwitches, held, in_state
from agent.dicom.files import DEFAULT_MAX_BYTES, read_header
from agent.domain import Manifest, ModelInput
from agent.errors import PermanentError
from agent.logs import log_context
from agent.settings import ModelSettings
from agent.spool.layout import SpoolLayout
from agent.spool.writer import write_atomic

log = logging.getLogger(__name__)

# Set by a pull (`pacs-agent submit`, the poller, the HTTP API) on the study it has retrieved
# whole: sealed at the next tick, and processed even when its input is unchanged.
PULLED_FROM = "pulled from"


@dataclass(frozen=True)
class QueuedJob:
    """A job just queued: to be sent, unless a model of it is paused (`waits_for`)."""

    job_id: str
    models: tuple[str, ...]
    waits_for: list[str]


class Sealer:
    """Makes a sealed study's transitions up to `queued` and writes its job's manifest.

    Runs on the assembler's thread, which alone calls it.
    """

    def __init__(
        self,
        db: Database,
        layout: SpoolLayout,
        models: tuple[ModelSettings, ...],
        switches: ModelSwitches,
        urgent_senders: tuple[str, ...],
        max_instance_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._db = db
        self._layout = layout
        self._models = models
        self._switches = switches
        self._urgent_senders = urgent_senders
        self._max_bytes = max_instance_bytes

    def seal(self, study: Study, why: str = "") -> QueuedJob | None:
        """Seal a receiving (or complete) study, `why` as its `complete` transition says;
        the job queued, or None when the study was skipped or is done again.

        A study left `complete` (a stop or a failure after that transition) is sealed again
        with the `why` its transition recorded.
        """
        with log_context(study=study.study_key):
            paths = [p for p in self._db.instance_paths(study.id) if p.exists()]
            if study.state == State.RECEIVING:
                count = f"{len(paths)} instances"
                self._db.transition(
                    study.study_uid,
                    State.COMPLETE,
                    f"{why}; {count}" if why else count,
                    expect_state=[State.RECEIVING],
                )
                if why:
                    log.info("study sealed: %s", why)
            elif not why:
                why = study.reason.rpartition("; ")[0]
            note = why if PARTIAL in why else ""
            headers = _readable_headers(paths, self._max_bytes)
            states = self._switches.effective(self._models)
            choices = without_switched_off(select(headers, self._models), states)
            inputs = tuple(c.input for c in choices if c.input is not None)
            if not inputs:
                reason = "; ".join(c.reason for c in choices)
                log.info("study skipped: %s", reason)
                self._db.transition(study.study_uid, State.SKIPPED, reason)
                return None
            for choice in choices:
                if choice.input is None:
                    log.info("model not run: %s", choice.reason)
            contents = self._db.instance_digests(study.id)
            digest = input_digest(inputs, headers, contents)
            # A pull is a request to process: it runs again even with the same input (the
            # same output UIDs, so the PACS keeps one copy of each object).
            if digest == study.done_digest and not why.startswith(PULLED_FROM):
                # Late arrivals outside every model's input (an SR, a re-sent instance):
                # the results already sent stand, and nothing new is produced.
                self._db.transition(
                    study.study_uid,
                    State.DONE,
                    f"input unchanged; results of revision {study.revision} stand",
                    expect_state=[State.COMPLETE],
                )
                log.info("study complete again with an unchanged input; nothing to do")
                return None
            revision = study.revision if digest == study.input_digest else study.revision + 1
            revision = max(revision, 1)
            job_id = f"{study.study_key}-{uuid.uuid4().hex[:12]}"
            sender = study_sender(self._db, study) if self._urgent_senders else ""
            priority, urgent = study_priority(inputs, self._models, sender, self._urgent_senders)
            manifest = Manifest(
                job_id,
                study.study_uid,
                inputs,
                revision,
                priority,
                note,
                input_contents(inputs, headers, contents),
            )
            manifest_path = self._layout.manifest_path(job_id)
            write_atomic(manifest_path, [manifest.to_json().encode()], self._layout.tmp)
            summary = ", ".join(f"{i.model}: {len(i.frames)} slices" for i in inputs)
            # What selection left out of a series a model takes (a scout saved into it).
            dropped = "; ".join(c.reason for c in choices if c.input is not None and c.reason)
            if dropped:
                summary += f"; {dropped}"
            if urgent:
                summary += f"; urgent ({urgent})"
            if note:
                summary += f"; {note}"
            waits_for = in_state(manifest.models, states, "paused")
            self._db.transition(
                study.study_uid,
                State.QUEUED,
                held(waits_for) if waits_for else summary,
                job_id=job_id,
                expect_state=[State.COMPLETE],
                input_digest=digest,
                revision=revision,
            )
            log.info("study complete: %s, revision %d, job %s", summary, revision, job_id)
            return QueuedJob(job_id, manifest.models, waits_for)


def input_digest(
    inputs: Sequence[ModelInput],
    headers: Mapping[Path, Dataset],
    contents: Mapping[Path, str] | None = None,
) -> str:
    """What the results derive from: each model and the SOP Instances (and frames) it reads,
    with each instance's content digest where known (`contents`, by path).

    Equal digests mean equal output UIDs (agent.dicom.uids), so an equal input is never given
    a new revision number: one SOP Instance UID must not name two different objects. A slice
    re-sent with other content under its UID changes the digest, so it is processed again.
    An instance whose content digest is not known (recorded by an older version) adds what
    it added before, so that such a study's digest is unchanged.
    """
    known = contents or {}
    digest = hashlib.sha256()
    for item in sorted(inputs, key=lambda i: i.model):
        refs = sorted(_ref(headers[f.path], f.index, known.get(f.path, "")) for f in item.frames)
        digest.update(json.dumps([item.model, refs]).encode())
    return digest.hexdigest()


def _ref(ds: Dataset, index: int, content: str) -> str:
    ref = f"{ds.SOPInstanceUID}:{index}"
    return f"{ref}:{content}" if content else ref


def input_contents(
    inputs: Sequence[ModelInput], headers: Mapping[Path, Dataset], contents: Mapping[Path, str]
) -> tuple[tuple[str, str], ...]:
    """(SOP Instance UID, content digest) of every input instance whose digest is known."""
    found = {
        str(headers[path].SOPInstanceUID): contents[path]
        for item in inputs
        for path in item.files
        if contents.get(path)
    }
    return tuple(sorted(found.items()))


def _readable_headers(paths: list[Path], max_bytes: int) -> dict[Path, Dataset]:
    """Headers of the study's instances; one that cannot be parsed is left out, with a warning.

    The receiver validates only the identifying elements, so a dataset damaged further on is
    stored (and acknowledged) but cannot be used; it must not block the rest of the study.
    """
    headers: dict[Path, Dataset] = {}
    for path in paths:
        try:
            headers[path] = read_header(path, max_bytes=max_bytes)
        except PermanentError as exc:
            log.warning("instance not usable: %s", exc)
    return headers
