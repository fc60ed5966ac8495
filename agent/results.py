"""A model's result on disk, handed from the GPU worker to the IO worker by path."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent.domain import Code, Measurement, ModelIdentity, SegmentSpec
from agent.spool.writer import write_atomic

_MASKS = "masks.npz"
_META = "result.json"


@dataclass(frozen=True)
class ModelResult:
    model: ModelIdentity
    segments: tuple[SegmentSpec, ...]
    measurements: tuple[Measurement, ...]
    masks: np.ndarray  # bool, (segments, z, y, x)


def save_result(folder: Path, result: ModelResult, tmp_dir: Path) -> None:
    """Write masks then metadata; the metadata file's presence marks the result complete."""
    packed = np.packbits(result.masks.astype(bool), axis=None)
    buffer = io.BytesIO()
    np.savez(buffer, packed=packed, shape=np.asarray(result.masks.shape))
    write_atomic(folder / _MASKS, [buffer.getvalue()], tmp_dir)
    meta = {
        "model": asdict(result.model),
        "segments": [asdict(s) for s in result.segments],
        "measurements": [asdict(m) for m in result.measurements],
    }
    write_atomic(folder / _META, [json.dumps(meta, indent=1).encode()], tmp_dir)


def has_result(folder: Path) -> bool:
    return (folder / _META).is_file()


def load_result(folder: Path) -> ModelResult:
    meta = json.loads((folder / _META).read_text())
    with np.load(folder / _MASKS) as data:
        shape = tuple(int(x) for x in data["shape"])
        count = int(np.prod(shape))
        masks = np.unpackbits(data["packed"], count=count).astype(bool).reshape(shape)
    segments = tuple(
        SegmentSpec(
            number=s["number"],
            label=s["label"],
            category=Code(**s["category"]),
            type=Code(**s["type"]),
            tracking_id=s["tracking_id"],
            color_lab=tuple(s["color_lab"]) if s.get("color_lab") else None,
            measurements=tuple(s.get("measurements", ("volume", "mean"))),
        )
        for s in meta["segments"]
    )
    return ModelResult(
        model=ModelIdentity(**meta["model"]),
        segments=segments,
        measurements=tuple(Measurement(**m) for m in meta["measurements"]),
        masks=masks,
    )
