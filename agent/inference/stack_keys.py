"""Split the frames of one geometry group into candidate stacks by their stack key.

Strong key items always tell stacks apart; weak ones (frames.WEAK_KEYS) only where frames of
several weak values cover one range of positions along the slice normal. geometry.gate then
checks that each candidate's positions form a volume.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from agent.inference.frames import WEAK_KEYS, Frame, key_keyword

# Two frames closer than this along the normal (mm) occupy the same position.
DUPLICATE_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class Candidate:
    """Frames of one geometry group and one stack key: one stack, if their positions allow."""

    frames: tuple[Frame, ...]
    group: int  # index of the geometry group, largest first
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        """The stack key items all its frames share."""
        shared = set(self.frames[0].stack_key).intersection(*(f.stack_key for f in self.frames))
        return tuple(item for item in self.frames[0].stack_key if item in shared)


def along(frame: Frame, normal: np.ndarray) -> float:
    """The position of a frame along a slice normal, in mm."""
    return float(normal @ np.asarray(frame.position))


def natural_order(items: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """A sort key that orders "AcquisitionNumber 10" after "AcquisitionNumber 2"."""
    parts = (p for item in items for p in re.split(r"(\d+)", item) if p)
    return tuple((0, f"{int(p):020d}") if p.isdigit() else (1, p) for p in parts)


def join_words(words: Sequence[str]) -> str:
    """Words as a phrase for a note: "a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _overlap(parts: Sequence[Sequence[Frame]], normal: np.ndarray) -> bool:
    """Whether the ranges the parts cover along the normal overlap or touch."""
    ranges = sorted(
        (min(along(f, normal) for f in part), max(along(f, normal) for f in part)) for part in parts
    )
    return any(b[0] - a[1] < DUPLICATE_TOLERANCE_MM for a, b in pairwise(ranges))


def split_by_key(group: Sequence[Frame], index: int) -> list[Candidate]:
    """One geometry group split by stack key: always by the strong items; by the weak ones only
    where frames of several weak values cover one range of positions (see frames.WEAK_KEYS)."""
    normal = group[0].normal
    strong: dict[tuple[str, ...], list[Frame]] = defaultdict(list)
    for frame in group:
        strong[tuple(i for i in frame.stack_key if key_keyword(i) not in WEAK_KEYS)].append(frame)
    candidates: list[Candidate] = []
    for _, part in sorted(strong.items(), key=lambda item: natural_order(item[0])):
        weak: dict[tuple[str, ...], list[Frame]] = defaultdict(list)
        for frame in part:
            weak[tuple(i for i in frame.stack_key if key_keyword(i) in WEAK_KEYS)].append(frame)
        if len(weak) == 1:
            candidates.append(Candidate(tuple(part), index))
        elif _overlap(list(weak.values()), normal):
            candidates += [
                Candidate(tuple(frames), index)
                for _, frames in sorted(weak.items(), key=lambda item: natural_order(item[0]))
            ]
        else:
            seen: dict[str, list[str]] = defaultdict(list)
            for key in weak:
                for item in key:
                    seen[key_keyword(item)].append(item)
            # A keyword varies if it takes several values or is absent from some frames.
            varying = sorted(k for k, v in seen.items() if len(set(v)) > 1 or len(v) < len(weak))
            note = f"joined {len(weak)} {join_words(varying)} values that cover separate positions"
            candidates.append(Candidate(tuple(part), index, (note,)))
    return candidates
