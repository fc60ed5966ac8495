"""Path layout of the spool: one folder per study and series, named by hashes, never by identity."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from agent.logs import study_key

# PS3.5 9.1: a UID is dot-separated numeric components, at most 64 characters. Checking this
# also keeps a hostile UID from naming a path outside the spool.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.match(value) is not None


@dataclass(frozen=True)
class SpoolLayout:
    root: Path

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def create(self) -> None:
        for folder in (self.studies, self.tmp, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)

    def study_dir(self, study_uid: str) -> Path:
        return self.studies / study_key(study_uid)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        series = hashlib.sha256(series_uid.encode("ascii")).hexdigest()[:16]
        return self.study_dir(study_uid) / series / f"{sop_uid}.dcm"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def manifest_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "manifest.json"
