"""Content digest of a spooled instance: SHA-256 of its dataset, after the file meta group.

The meta group is left out because it names the sender (Source AE Title) and the writer, not
the content: the same dataset sent again, by C-STORE, STOW-RS or a pull, has the same digest,
and a re-sent instance whose content changed under the same SOP Instance UID has another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.receive.filemeta import read_file_meta

_CHUNK = 1024 * 1024


def dataset_digest(path: Path) -> str:
    """The hex SHA-256 of the dataset of the Part 10 file at `path`, read in chunks.

    Raises OSError when the file cannot be read, Unreadable (a PermanentError) when it has no
    meta group.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        read_file_meta(fp)
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_digest(dataset: bytes) -> str:
    """The digest of a dataset held in memory (the bytes that follow its meta group)."""
    return hashlib.sha256(dataset).hexdigest()
