"""Load a test series the way a worker does: its one stack, in slice order, as a Volume."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agent.dicom.files import read_header
from agent.domain import FrameRef
from agent.inference.frames import frames_of
from agent.inference.geometry import Rejected, gate
from agent.inference.volume import Volume, load_volume


def stack_refs(files: Iterable[Path]) -> list[FrameRef]:
    """The frames of the largest stack the files form, in slice order; fails if there is none."""
    frames = []
    for path in files:
        got = frames_of(path, read_header(path))
        assert not isinstance(got, str), f"{path.name}: {got}"
        frames += got
    stacks = gate(frames)
    assert not isinstance(stacks, Rejected), stacks.reason
    return [FrameRef(f.path, f.index) for f in stacks[0].frames]


def load_files(files: Iterable[Path]) -> Volume:
    return load_volume(stack_refs(files))
