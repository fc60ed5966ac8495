"""Small frozen value types that cross process and module boundaries."""

from __future__ import annotations

import enum
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
    # RecommendedDisplayCIELabValue as DICOM stores it (PS3.3 C.10.7.1.1); None: viewer's choice.
    color_lab: tuple[int, int, int] | None = None
    # What the SR reports for the segment (TID 1411): "volume", and "mean" (attenuation, CT).
    measurements: tuple[str, ...] = ("volume", "mean")


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result; goes into SEG algorithm identification and Contributing Equipment."""

    name: str
    version: str
    manufacturer: str
    device_uid: str  # deterministic: from the weights' SHA-256 (and code, for Python packages)
    # Shown with the results (SEG and SR ImageComments), e.g. "research use, not for diagnosis".
    intended_use: str = "research use, not for diagnosis"


@dataclass(frozen=True)
class Measurement:
    """Per-segment measurements reported in the TID 1500 SR."""

    segment_number: int
    volume_ml: float
    mean_hu: float
    voxel_count: int


@dataclass(frozen=True)
class FrameRef:
    """One 2-D frame of a spooled instance: the file and the 0-based frame index within it."""

    path: Path
    index: int = 0


@dataclass(frozen=True)
class ModelInput:
    """The stack of frames one model runs on: one series, in slice order (ascending normal)."""

    model: str
    series_uid: str
    frames: tuple[FrameRef, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        """The distinct instances of the stack, in order of first appearance."""
        return tuple(dict.fromkeys(f.path for f in self.frames))


class Priority(enum.StrEnum):
    """How soon a job runs: urgent jobs go first, normal ones are never starved by them."""

    NORMAL = "normal"
    URGENT = "urgent"


@dataclass(frozen=True)
class Manifest:
    """What the assembler hands to a GPU worker: every model's input for one study."""

    job_id: str
    study_uid: str
    inputs: tuple[ModelInput, ...]  # one per model that runs, in the configured order
    # 1 for a study's first processed input, +1 for each later, different one (late arrivals);
    # the results' InstanceNumber, so viewers show the newest.
    revision: int = 1
    # Decided once, when the study is sealed (its sender, its models); the job's queues follow it.
    priority: Priority = Priority.NORMAL
    # What the study's final state must say about its input (policy.PARTIAL: sealed while
    # instances may be missing); empty when the input is the whole study as sent.
    note: str = ""
    # The content digest of each input instance, (SOP Instance UID, digest), where known: it
    # enters the output UIDs, so that other content under an input's UID gives other objects.
    contents: tuple[tuple[str, str], ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(i.model for i in self.inputs)

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "study_uid": self.study_uid,
                "revision": self.revision,
                "priority": self.priority.value,
                "note": self.note,
                "contents": dict(self.contents),
                "inputs": [
                    {
                        "model": i.model,
                        "series_uid": i.series_uid,
                        "frames": [[str(f.path), f.index] for f in i.frames],
                    }
                    for i in self.inputs
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            job_id=raw["job_id"],
            study_uid=raw["study_uid"],
            revision=int(raw.get("revision", 1)),
            # Manifests written before priorities existed are normal.
            priority=Priority(raw.get("priority", Priority.NORMAL)),
            note=str(raw.get("note", "")),
            # Manifests written before digests were kept have none.
            contents=tuple((str(k), str(v)) for k, v in raw.get("contents", {}).items()),
            inputs=tuple(
                ModelInput(
                    model=i["model"],
                    series_uid=i["series_uid"],
                    frames=tuple(FrameRef(Path(path), int(index)) for path, index in i["frames"]),
                )
                for i in raw["inputs"]
            ),
        )
