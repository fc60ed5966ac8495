"""Path layout of the spool: one folder per study and series, named by hashes, never by identity."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from agent.logs import study_key


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

    @staticmethod
    def series_folder(series_uid: str) -> str:
        """A series' folder name in the spool: a hash of its UID, not the UID."""
        return hashlib.sha256(series_uid.encode("ascii")).hexdigest()[:16]

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.study_dir(study_uid) / self.series_folder(series_uid) / f"{sop_uid}.dcm"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def manifest_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "manifest.json"
