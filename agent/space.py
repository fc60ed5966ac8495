"""Disk space running out while a step writes (results, the outbox): a wait, not a failure."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from agent.errors import RetryableError

# A full disk (or quota) is transient: space comes back when the retention sweep, a person or
# another job frees some. A filesystem remounted read-only after errors (EROFS) is not: it
# needs a person, and stays a failure with its reason.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class WaitingForDisk(RetryableError):
    """Results or the outbox could not be written for want of disk space; the step waits."""


@contextlib.contextmanager
def disk_space(what: str) -> Iterator[None]:
    """Turn "no space left" while writing `what` into WaitingForDisk."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        cause = os.strerror(exc.errno)
        raise WaitingForDisk(
            f"{what} could not be written ({cause[:1].lower()}{cause[1:]})"
        ) from None
