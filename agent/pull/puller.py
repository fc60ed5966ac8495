"""Pull one study from a source into the spool, checked as C-STORE checks, then hand it on.

The instances are written as the receiver writes them and recorded as arrivals; the study is
then marked "pulled from <source>", which tells the assembler that it is whole: it is sealed
at its next tick, without a quiet period, and processed even if an earlier run had the same
input (a pull is a request to process). A pull that fails part way removes the files it added,
so no half study is left to be sealed later by silence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.uid import UID

from agent import audit
from agent.assembly.sealing import PULLED_FROM
from agent.db.database import Database
from agent.db.states import State
from agent.db.values import ArrivedInstance
from agent.errors import RetryableError
from agent.logs import log_context, study_key
from agent.pull.checks import Refused, checked
from agent.pull.source import SourceRefused, StudyNotFound, StudySource
from agent.receive.filemeta import encode_file_meta, read_file_meta
from agent.receive.identify import Unreadable
from agent.spool.arrival import Refusal, admit
from agent.spool.digest import bytes_digest
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.spool.writer import write_atomic

log = logging.getLogger(__name__)


class SpoolUnavailable(RetryableError):
    """The spool is low on space or cannot be written: the pull waits for room."""


class PullCancelled(RetryableError):
    """The process is stopping; the pull is undone and can be made again."""


@dataclass(frozen=True)
class PullResult:
    study_key: str
    source: str
    stored: int
    refused: int
    # NumberOfStudyRelatedInstances as the source gave it before the retrieval.
    expected: int


class Puller:
    """Writes pulled instances to the spool and the database; one per process is enough."""

    def __init__(
        self,
        db: Database,
        layout: SpoolLayout,
        *,
        max_instance_bytes: int,
        watermark: Watermark | None = None,
    ) -> None:
        self._db = db
        self._layout = layout
        self._max_bytes = max_instance_bytes
        self._watermark = watermark

    def pull(
        self,
        source: StudySource,
        study_uid: str,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> PullResult:
        """Retrieve every instance of the study; raises StudyNotFound, SourceUnavailable,
        SourceRefused, SpoolUnavailable or PullCancelled (when `cancelled()` turns true), and
        then leaves nothing of this pull behind."""
        key = study_key(study_uid)
        with log_context(study=key):
            expected = source.instance_count(study_uid)
            if expected is None:
                raise StudyNotFound(f"study {key} is not in {source.name}")
            self._check_room()
            arrivals: list[ArrivedInstance] = []
            added: list[Path] = []
            refused = 0
            try:
                for part in source.instances(study_uid):
                    if cancelled():
                        raise PullCancelled(f"pull from {source.name} cancelled: stopping")
                    arrival = self._store(part, study_uid, added)
                    if arrival is None:
                        refused += 1
                    else:
                        arrivals.append(arrival)
                if not arrivals:
                    raise SourceRefused(
                        f"retrieval from {source.name}: no usable instance of study {key}"
                    )
                self._db.record_arrivals(arrivals)
            except BaseException:
                for path in added:
                    path.unlink(missing_ok=True)
                raise
            reason = f"{PULLED_FROM} {source.name}: {len(arrivals)} instances"
            self._db.transition(study_uid, State.RECEIVING, reason)
            if len(arrivals) != expected:
                log.warning(
                    "%s listed %d instances and sent %d", source.name, expected, len(arrivals)
                )
            log.info(
                "pulled %d instances from %s (%d refused)", len(arrivals), source.name, refused
            )
            audit.instances_received(
                source=audit.Peer(address=source.name),
                destination=audit.Peer(),
                studies=[audit.StudyCount(key, len(arrivals), refused)],
                ended="pulled",
            )
            return PullResult(key, source.name, len(arrivals), refused, expected)

    def _check_room(self) -> None:
        if self._watermark is not None:
            level = self._watermark.check()
            if level.low:
                raise SpoolUnavailable(f"spool low: {level.reason}")

    def _store(self, part: bytes, study_uid: str, added: list[Path]) -> ArrivedInstance | None:
        """Check one Part 10 instance as the C-STORE handler checks a dataset, then write it
        as the handler does; None (and a warning) for one that is refused."""
        if len(part) > self._max_bytes:
            log.warning("refused a pulled instance of %d bytes: over the limit", len(part))
            return None
        fp = BytesIO(part)
        try:
            meta = read_file_meta(fp)
            syntax = UID(meta.transfer_syntax_uid)
            raw = part[fp.tell() :]
            ids = checked(raw, syntax, meta.sop_class_uid, meta.sop_uid)
        except (Unreadable, Refused, ValueError) as exc:
            log.warning("refused a pulled instance: %s", exc)
            return None
        # An instance of another study than the one asked for is the source's mistake.
        if ids.study_uid != study_uid:
            log.warning("refused a pulled instance: it belongs to another study")
            return None
        # No calling AE title: a pulled study is never checked by count (it is whole already).
        header = encode_file_meta(ids.sop_class_uid, ids.sop_uid, str(syntax), "")

        def place(path: Path) -> None:
            existed = path.exists()
            write_atomic(path, (header, raw), self._layout.tmp)
            if not existed:
                added.append(path)

        # Admitted as the receivers admit: never a second copy of an instance in another
        # series of its study, and with the digest of its content.
        arrivals: list[ArrivedInstance] = []
        failure = admit(self._layout, ids, place, arrivals.append, digest=bytes_digest(raw))
        if failure is None:
            return arrivals[0]
        if failure.refusal is Refusal.OUT_OF_RESOURCES:
            raise SpoolUnavailable(failure.reason)
        return None  # admit has logged why
