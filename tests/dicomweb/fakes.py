"""A scripted source for the pull, poll and count tests: Part 10 files from a folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pydicom

from agent.pull.source import FoundStudy, SourceUnavailable
from agent.settings import SourcePoll


@dataclass
class FakeSource:
    """Holds studies as lists of Part 10 files; `down` makes every call fail as unreachable."""

    name: str = "archive"
    studies: dict[str, list[Path]] = field(default_factory=dict)
    down: bool = False
    # Fail the retrieval after this many instances (a connection that breaks off).
    break_after: int | None = None
    calls: list[str] = field(default_factory=list)

    def add(self, files: list[Path]) -> str:
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.studies[uid] = list(files)
        return uid

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise SourceUnavailable(f"{what} at {self.name}: connection failed")

    def instance_count(self, study_uid: str) -> int | None:
        self._check("count")
        files = self.studies.get(study_uid)
        return None if files is None else len(files)

    def search(self, poll: SourcePoll, today: date) -> list[FoundStudy]:
        self._check("search")
        return [FoundStudy(uid, len(files)) for uid, files in self.studies.items()]

    def instances(self, study_uid: str) -> Iterator[bytes]:
        self._check("retrieve")
        for index, path in enumerate(self.studies[study_uid]):
            if self.break_after is not None and index == self.break_after:
                raise SourceUnavailable(f"retrieve from {self.name}: connection failed")
            yield path.read_bytes()
