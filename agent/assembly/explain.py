"""`pacs-agent rules test`: which model would take each series of some DICOM files, and why not."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from agent.assembly.rules import Series, choose, describe
from agent.dicom.files import DEFAULT_MAX_BYTES, read_header
from agent.dicom.inflate import InflatedTooLarge
from agent.errors import PermanentError
from agent.logs import study_key
from agent.settings import ModelSettings

log = logging.getLogger(__name__)


def dicom_files(root: Path) -> Iterator[Path]:
    """`root` itself if it is a file, else every file below it (any name), sorted."""
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise PermanentError(f"{root}: no such file or folder")
    yield from sorted(p for p in root.rglob("*") if p.is_file())


def read_headers(
    root: Path, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[dict[Path, Dataset], list[str]]:
    """Headers of every DICOM file under root, and one line per file that is not read: not
    DICOM, or a deflated dataset that inflates past `max_bytes` (the receiver would refuse it)."""
    headers: dict[Path, Dataset] = {}
    unreadable: list[str] = []
    for path in dicom_files(root):
        try:
            headers[path] = read_header(path, max_bytes=max_bytes)
        except InflatedTooLarge as exc:
            unreadable.append(f"refused: {path.name} ({exc})")
        except PermanentError as exc:
            # The user's own files: their names help here, where no UID-named spool file is.
            unreadable.append(f"not DICOM: {path.name} ({exc})")
    return headers, unreadable


def _sop_classes(series: Series) -> str:
    parts = []
    for uid, count in sorted(series.sop_classes.items()):
        name = UID(uid).name if uid else "no SOP class"
        parts.append(f"{count} x {name}")
    return ", ".join(parts)


def _study_lines(headers: dict[Path, Dataset], models: Sequence[ModelSettings]) -> list[str]:
    lines: list[str] = []
    all_series = describe(headers)
    choices = {m.name: choose(m, all_series) for m in models}
    for series in sorted(all_series, key=lambda s: (s.number is None, s.number or 0)):
        description = f" {series.description!r}" if series.description else ""
        lines.append(f"{series.label()}{description}: {_sop_classes(series)}")
        for stack in series.stacks:
            notes = f"; {'; '.join(stack.notes)}" if stack.notes else ""
            dz, dy, dx = stack.spacing
            lines.append(
                f"  stack: {len(stack.frames)} {stack.orientation} slices,"
                f" {dz:.3g} x {dy:.3g} x {dx:.3g} mm{notes}"
            )
        for name, choice in choices.items():
            verdict = next(v for v in choice.verdicts if v.series is series)
            # What sealing notes too: the instances the model's ImageType rules leave out.
            note = f"; {verdict.note}" if verdict.note else ""
            if verdict.stack is None:
                lines.append(f"  {name}: no: {verdict.reason}{note}")
            elif choice.input is not None and choice.input.series_uid == series.series_uid:
                slices = len(verdict.stack.frames)
                lines.append(f"  {name}: TAKES this series ({slices} slices){note}")
            else:
                lines.append(
                    f"  {name}: fits, but another series is taken"
                    f" (most slices first, then the lowest SeriesNumber, then UID){note}"
                )
    for name, choice in choices.items():
        if choice.input is None:
            lines.append(f"{name} would not run: {choice.reason}")
    return lines


def report(
    root: Path, models: Sequence[ModelSettings], max_bytes: int = DEFAULT_MAX_BYTES
) -> list[str]:
    """The lines `rules test` prints: per study and series, its stacks and each model's verdict.

    `max_bytes` is the receiver's instance size limit, which a deflated file is held to.
    """
    headers, unreadable = read_headers(root, max_bytes)
    lines = [f"{len(headers)} DICOM files in {root}"]
    lines += [f"  {line}" for line in unreadable[:10]]
    if len(unreadable) > 10:
        lines.append(f"  ... and {len(unreadable) - 10} more files that are not read")
    studies: dict[str, dict[Path, Dataset]] = {}
    for path, ds in headers.items():
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), {})[path] = ds
    for study_uid, members in sorted(studies.items(), key=lambda item: study_key(item[0])):
        # Each study is selected on its own, as the assembler does; named by key, not UID.
        lines.append(f"study {study_key(study_uid)}: {len(members)} files")
        lines += [f"  {line}" for line in _study_lines(members, models)]
    return lines
