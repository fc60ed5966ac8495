"""File descriptors for `serve`: raise the soft limit, and keep the web port's share of them
small enough that the DICOM receiver always has its own.

The web port and the receiver share one process and so one RLIMIT_NOFILE. Without a bound, a
flood of half-sent HTTP requests took every descriptor and C-STORE and C-ECHO failed with
"Too many open files". The web port gets at most a fraction of what is left once the
descriptors in use, the receiver's associations and some headroom are set aside.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from agent.settings import Settings

log = logging.getLogger(__name__)

# Per association: its socket, the spool temp file being written, and one to spare.
DESCRIPTORS_PER_ASSOCIATION = 3
# Per web connection: its socket and the STOW-RS part being written, and a few parts being
# checked while the next one arrives; half of what is left goes to the web port.
DESCRIPTORS_PER_CONNECTION = 2
WEB_SHARE = 0.5
# Database connections, log and audit files, the decoding processes' pipes, Celery's own.
HEADROOM = 64
# Where the hard limit is "unlimited", the soft one is raised this far (Linux's default
# fs.nr_open is 1,048,576; systemd's LimitNOFILE=65536 is what the shipped units ask for).
UNLIMITED_TARGET = 65536


@dataclass(frozen=True)
class Descriptors:
    """The process's descriptor budget as `serve` starts its web port."""

    limit: int
    in_use: int


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    return UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def descriptors_in_use() -> int:
    """How many descriptors the process has open now (Linux /proc; 0 where unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def current() -> Descriptors:
    """Raise the limit and say where the process stands."""
    return Descriptors(limit=raise_open_files_limit(), in_use=descriptors_in_use())


def connection_cap(settings: Settings, descriptors: Descriptors) -> int:
    """The web port's connection limit: [web] max_connections, or less where the descriptors
    left after the receiver's share would not hold that many."""
    reserved = (
        descriptors.in_use
        + settings.receiver.max_associations * DESCRIPTORS_PER_ASSOCIATION
        + HEADROOM
    )
    spare = max(descriptors.limit - reserved, 0)
    share = int(spare * WEB_SHARE) // DESCRIPTORS_PER_CONNECTION
    cap = max(1, min(settings.web.max_connections, share))
    if cap < settings.web.max_connections:
        log.warning(
            "web port: at most %d connections, not [web] max_connections = %d: the open files "
            "limit is %d (raise LimitNOFILE) and the receiver keeps %d for %d associations",
            cap,
            settings.web.max_connections,
            descriptors.limit,
            settings.receiver.max_associations * DESCRIPTORS_PER_ASSOCIATION,
            settings.receiver.max_associations,
        )
    return cap
