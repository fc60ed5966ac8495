"""`pacs-agent status --follow`: one study's state changes, printed as they happen."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from agent.cli_exits import EXIT_FAILURE, EXIT_OK
from agent.db.existing import open_existing
from agent.db.lookup import find_study, steps_after
from agent.db.states import TERMINAL, State
from agent.settings import Settings

# The database is asked again this often: a study's stages take seconds to minutes.
POLL_SECONDS = 1.0


def cmd_follow(
    settings: Settings,
    given: str,
    *,
    poll_seconds: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the study's state changes so far, then each new one, until it is done (exit 0),
    failed or skipped (exit 1: no results went out), or the operator stops (Ctrl-C, exit 0).

    Every recorded change is printed, also those between two looks (a study can pass from
    complete through queued to inferring within a second). A study reopened by a late
    instance after it ended is not waited for: following ends at the first end.
    """
    db = open_existing(settings.database_url)
    try:
        study = find_study(db, given)
        print(f"{study.study_key}  following (Ctrl-C stops)", flush=True)
        last = 0
        while True:
            steps = steps_after(db, study.id, last)
            for step in steps:
                reason = f" ({step.reason})" if step.reason else ""
                print(f"  {step.at.strftime('%Y-%m-%d %H:%M:%S')}Z  {step.state}{reason}")
                last = step.id
            if steps:
                sys.stdout.flush()
                if steps[-1].state in TERMINAL:
                    return EXIT_OK if steps[-1].state is State.DONE else EXIT_FAILURE
            sleep(poll_seconds)
    finally:
        db.dispose()
