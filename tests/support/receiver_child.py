"""The receiver in a process of its own, for tests that measure its memory.

`python -m tests.support.receiver_child SPOOL` prints the port, then its peak RSS in KiB;
at each line read from stdin it prints the peak RSS again; it ends with stdin.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from tests.support.receiver import Receiver, loopback_settings


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    with Receiver(Path(sys.argv[1]), loopback_settings()) as rx:
        print(rx.port, _peak_kib(), flush=True)
        for _line in sys.stdin:
            print(_peak_kib(), flush=True)


if __name__ == "__main__":
    main()
