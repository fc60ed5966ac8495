"""Job leases in the database: taken by the worker that runs a job's task, renewed while it runs,
and read by the assembler to tell a live worker's long task from a dead worker's job."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError

from agent.db.database import Database, as_utc, utcnow
from agent.db.schema import JobLease


def _rows(result: object) -> int:
    return cast(CursorResult[Any], result).rowcount


class Leases:
    """Conditional single statements, so that two workers never both hold one job's lease."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(self, job_id: str, holder: str, seconds: float) -> bool:
        """Take the job's lease for `seconds`: free, expired or already `holder`'s. False while
        another holder's lease is live (its worker is running the job now)."""
        now = utcnow()
        until = now + timedelta(seconds=seconds)
        with contextlib.suppress(IntegrityError), self._db.session() as s, s.begin():
            taken = s.execute(
                update(JobLease)
                .where(
                    JobLease.job_id == job_id,
                    (JobLease.expires_at < now) | (JobLease.holder == holder),
                )
                .values(holder=holder, renewed_at=now, expires_at=until)
                .execution_options(synchronize_session=False)
            )
            if _rows(taken) == 1:
                return True
            # No row (or a live one: then the insert fails on the primary key).
            s.execute(
                insert(JobLease).values(
                    job_id=job_id, holder=holder, renewed_at=now, expires_at=until
                )
            )
            return True
        return False

    def renew(self, job_id: str, holder: str, seconds: float) -> bool:
        """Extend `holder`'s lease; False if it is no longer theirs (it expired and was taken)."""
        now = utcnow()
        with self._db.session() as s, s.begin():
            renewed = s.execute(
                update(JobLease)
                .where(JobLease.job_id == job_id, JobLease.holder == holder)
                .values(renewed_at=now, expires_at=now + timedelta(seconds=seconds))
                .execution_options(synchronize_session=False)
            )
            return _rows(renewed) == 1

    def release(self, job_id: str, holder: str) -> None:
        """The task returned: the job is nobody's until its next message is delivered."""
        with self._db.session() as s, s.begin():
            s.execute(delete(JobLease).where(JobLease.job_id == job_id, JobLease.holder == holder))

    def expire(self, job_id: str, holder: str) -> None:
        """The task was interrupted (a shutdown): the job is free to be taken over at once."""
        with self._db.session() as s, s.begin():
            s.execute(
                update(JobLease)
                .where(JobLease.job_id == job_id, JobLease.holder == holder)
                .values(expires_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def expiries(self, job_ids: Iterable[str]) -> dict[str, datetime]:
        """When each of these jobs' leases expires (expired: its worker is gone); only jobs
        with a lease, i.e. whose task started and has not returned."""
        wanted = list(job_ids)
        if not wanted:
            return {}
        with self._db.session() as s:
            rows = s.execute(
                select(JobLease.job_id, JobLease.expires_at).where(JobLease.job_id.in_(wanted))
            ).all()
            return {str(job): as_utc(at) for job, at in rows}

    def forget_expired(self, before: datetime, keep: Iterable[str]) -> int:
        """Delete the leases that expired before `before`, except those of the jobs in `keep`
        (the in-flight ones, whose expired lease says their worker died); returns how many.

        A killed worker's lease of a job that has since ended or been superseded (a late
        arrival made a new job) is read by nobody: without this the table only grows.
        """
        kept = list(keep)
        with self._db.session() as s, s.begin():
            query = delete(JobLease).where(JobLease.expires_at < before)
            if kept:
                query = query.where(JobLease.job_id.not_in(kept))
            return _rows(s.execute(query.execution_options(synchronize_session=False)))
