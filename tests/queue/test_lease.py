"""Job leases: one holder at a time, renewed while the task runs, freed when it returns."""

from __future__ import annotations

import os
import time

import pytest

from agent.db.database import Database, utcnow
from agent.db.leases import Leases
from agent.queue.lease import holder_name, job_lease


def test_a_live_lease_keeps_its_job_and_an_expired_one_is_taken_over(db: Database) -> None:
    leases = Leases(db)
    assert leases.acquire("job-1", "worker-a", 60)
    assert not leases.acquire("job-1", "worker-b", 60)  # worker-a runs it now
    assert leases.acquire("job-1", "worker-a", 60)  # its own, again
    assert leases.acquire("job-2", "worker-b", 60)  # another job is free
    leases.expire("job-1", "worker-a")  # worker-a was stopped mid-task
    assert leases.acquire("job-1", "worker-b", 60)
    assert not leases.renew("job-1", "worker-a", 60)  # no longer worker-a's
    assert leases.renew("job-1", "worker-b", 60)
    leases.release("job-1", "worker-b")
    assert set(leases.expiries(["job-1", "job-2"])) == {"job-2"}


def test_a_running_task_renews_its_lease_and_gives_it_up_when_it_returns(db: Database) -> None:
    leases = Leases(db)
    with job_lease(db, "job-1", seconds=0.4) as mine:
        assert mine
        # Far longer than the lease: the renewing thread keeps it.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert not leases.acquire("job-1", "another-worker", 0.4)
            time.sleep(0.1)
        assert leases.expiries(["job-1"])["job-1"] > utcnow()
    assert leases.expiries(["job-1"]) == {}
    assert holder_name().endswith(f":{os.getpid()}")


def test_a_task_held_by_a_live_worker_is_not_run(db: Database) -> None:
    assert Leases(db).acquire("job-1", "worker-elsewhere", 60)
    with job_lease(db, "job-1", seconds=60) as mine:
        assert not mine
    assert "job-1" in Leases(db).expiries(["job-1"])  # still the other worker's


def test_an_error_releases_the_lease_and_a_shutdown_expires_it(db: Database) -> None:
    with pytest.raises(ValueError), job_lease(db, "job-1", seconds=60):
        raise ValueError("the task failed")
    assert Leases(db).expiries(["job-1"]) == {}
    with pytest.raises(SystemExit), job_lease(db, "job-1", seconds=60):
        raise SystemExit(1)  # what a cold shutdown raises in the task
    # Kept, expired: the assembler sees at once that its worker is gone.
    assert Leases(db).expiries(["job-1"])["job-1"] <= utcnow()
    assert Leases(db).acquire("job-1", "next-worker", 60)
