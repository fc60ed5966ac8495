"""Durable writes: temp file, fsync, atomic rename, fsync of the folder (acknowledged = on disk)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
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


def write_atomic(target: Path, chunks: Iterable[bytes], tmp_dir: Path) -> int:
    """Write `chunks` to `target` so that after return the bytes survive a power cut.

    The file appears under its final name only complete: a crash leaves at most a stray temp
    file in `tmp_dir`, which must be on the same filesystem. Returns the number of bytes written.
    """
    ensure_dir(target.parent)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return size
