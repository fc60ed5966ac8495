"""Small frozen value types that cross process and module boundaries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. ("10200004", "SCT", "Liver")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """One output segment of a model: its number in the label map and how it is coded in DICOM."""

    number: int  # 1-based, as in SEG SegmentNumber
    label: str  # short label, e.g. "Lungs"
    category: Code  # CID 7150 segmentation property category
    type: Code  # CID 7151 segmentation property type
    tracking_id: str  # human-readable tracking identifier, stable across studies


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result; goes into SEG algorithm identification and Contributing Equipment."""

    name: str
    version: str
    manufacturer: str
    device_uid: str  # deterministic from name and version


@dataclass(frozen=True)
class Measurement:
    """Per-segment measurements reported in the TID 1500 SR."""

    segment_number: int
    volume_ml: float
    mean_hu: float
    voxel_count: int


@dataclass(frozen=True)
class Manifest:
    """The selected series of one study, as handed from the assembler to a GPU worker."""

    job_id: str
    study_uid: str
    series_uid: str
    models: tuple[str, ...]  # every configured model runs on the series, in this order
    files: tuple[Path, ...]  # the instances of the selected series, in slice order

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "study_uid": self.study_uid,
                "series_uid": self.series_uid,
                "models": list(self.models),
                "files": [str(p) for p in self.files],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            job_id=raw["job_id"],
            study_uid=raw["study_uid"],
            series_uid=raw["series_uid"],
            models=tuple(raw["models"]),
            files=tuple(Path(p) for p in raw["files"]),
        )
