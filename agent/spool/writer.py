"""Durable writes: temp file, fsync, atomic rename, fsync of the folder (acknowledged = on disk)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Path) -> None:
    """Create a folder and make its entry durable in each parent that was newly created."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(path.parent)


def write_atomic(target: Path, chunks: Sequence[bytes], tmp_dir: Path) -> int:
    """Write `chunks` to `target` so that after return the bytes survive a power cut.

    The file appears under its final name only complete: a crash leaves at most a stray temp
    file in `tmp_dir`, which must be on the same filesystem. Returns the number of bytes written.
    Plain descriptors and one writev: this is on the C-STORE path, before the acknowledgement.
    """
    ensure_dir(target.parent)
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = sum(len(c) for c in chunks)
        written = os.writev(fd, chunks)
        if written != size:  # short write (disk full mid-way, signals): finish it plainly
            data = b"".join(chunks)[written:]
            while data:
                data = data[os.write(fd, data) :]
        # fdatasync: the data and the file's size, without the timestamps nobody needs.
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return size


def move_atomic(source: Path, target: Path) -> None:
    """Give a file already made durable by its writer (fdatasync) its final name, durably.

    For an instance that arrived in pieces (a STOW-RS part streamed to `source` in the spool's
    tmp folder, on the same filesystem): the rename and its folder are synced before return.
    """
    ensure_dir(target.parent)
    os.replace(source, target)
    _fsync_dir(target.parent)
