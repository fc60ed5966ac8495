"""When each result was first encoded: one time per result, kept for every later encoding."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError

from agent.db.database import Database, as_utc
from agent.db.schema import ResultStamp


class ResultStamps:
    """The result_stamp table of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def made_at(self, result_uid: str, now: datetime) -> datetime:
        """The time recorded for `result_uid`, recording `now` (UTC) first if there is none.

        Two workers encoding the same result at once both get the time of the one that
        recorded first.
        """
        with self._db.session() as s:
            row = s.get(ResultStamp, result_uid)
            if row is not None:
                return as_utc(row.made_at)
        try:
            with self._db.session() as s, s.begin():
                s.add(ResultStamp(result_uid=result_uid, made_at=now))
        except IntegrityError:
            pass  # another worker recorded it between our read and our insert
        else:
            return now
        with self._db.session() as s:
            row = s.get(ResultStamp, result_uid)
            if row is None:  # pragma: no cover - a row is only deleted with its database
                raise RuntimeError("result stamp vanished")
            return as_utc(row.made_at)
