"""Series selection: which series of a study each configured model takes, and why not the others."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from agent.domain import FrameRef, ModelInput
from agent.errors import PermanentError
from agent.inference.decode import decoder_for, no_decoder_reason
from agent.inference.frames import IMAGE_SOP_CLASSES, SINGLE_FRAME_SOP_CLASSES, Frame, frames_of
from agent.inference.geometry import Rejected, Stack, gate, plural
from agent.settings import ModelSettings, SelectRules


@dataclass(frozen=True)
class Series:
    """One series of a study as selection sees it: its descriptive headers and its stacks."""

    series_uid: str
    number: int | None
    modality: str
    description: str
    body_part: str
    image_types: frozenset[str]  # each instance's ImageType joined with backslashes
    contrast: bool
    sop_classes: Mapping[str, int]  # SOP Class UID -> instance count
    stacks: tuple[Stack, ...]
    # Why the series has no stack (not an image, bad geometry); empty when it has stacks.
    problem: str
    syntaxes: frozenset[str]  # transfer syntaxes of its image instances
    # Its instances' headers, for a model whose ImageType rules take only some of them.
    members: tuple[tuple[Path, Dataset], ...] = field(default=(), compare=False, repr=False)
    # The series without some instances, by the paths left out: built once per selection.
    _narrowed: dict[frozenset[Path], Series] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def size(self) -> int:
        return sum(self.sop_classes.values())

    def label(self) -> str:
        number = "?" if self.number is None else str(self.number)
        return f"series {number} ({self.modality or '?'}, {self.size} instances)"

    @property
    def is_image(self) -> bool:
        return any(sop in IMAGE_SOP_CLASSES for sop in self.sop_classes)


@dataclass(frozen=True)
class Verdict:
    """One model's decision on one series: the stack it takes, or why it takes none."""

    series: Series
    stack: Stack | None
    reason: str  # empty when stack is set
    # Instances of the series the model's ImageType rules left out, and why; "" for none.
    note: str = ""


@dataclass(frozen=True)
class ModelChoice:
    """What one model gets from a study: its input, or (input None) the reason it gets none."""

    model: str
    input: ModelInput | None
    # Why the model takes nothing; with an input, what it left out of the series taken.
    reason: str
    verdicts: tuple[Verdict, ...]


def _series_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _image_type(ds: Dataset) -> str:
    value = ds.get("ImageType")
    if value is None:
        return ""
    if isinstance(value, str):
        return value.upper()
    return "\\".join(str(v) for v in value).upper()


def _has_contrast(ds: Dataset) -> bool:
    # PS3.3 C.7.6.4: Contrast/Bolus Agent is Type 2 (present, maybe empty) when contrast is
    # used; Enhanced images code it in Contrast/Bolus Agent Sequence (C.7.6.4b).
    return bool(_text(ds, "ContrastBolusAgent")) or bool(ds.get("ContrastBolusAgentSequence"))


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "") or "")


def describe(headers: Mapping[Path, Dataset]) -> list[Series]:
    """Every series of a study (headers read without pixel data), images stacked by the gate."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path, ds in sorted(headers.items(), key=lambda item: str(item[0])):
        groups[_text(ds, "SeriesInstanceUID")].append((path, ds))
    return [_series(uid, members) for uid, members in groups.items()]


def _series(series_uid: str, members: Sequence[tuple[Path, Dataset]]) -> Series:
    first = members[0][1]
    sop_classes: dict[str, int] = defaultdict(int)
    frames: list[Frame] = []
    problems: list[str] = []
    syntaxes: set[str] = set()
    for path, ds in members:
        sop_class = _text(ds, "SOPClassUID")
        sop_classes[sop_class] += 1
        if sop_class not in IMAGE_SOP_CLASSES:
            continue
        syntaxes.add(_syntax(ds))
        got = frames_of(path, ds)
        if isinstance(got, str):
            problems.append(got)
        else:
            frames += got
    stacks: tuple[Stack, ...] = ()
    problem = ""
    if not any(sop in IMAGE_SOP_CLASSES for sop in sop_classes):
        names = sorted(_sop_name(sop) for sop in sop_classes)
        problem = f"not an image series ({', '.join(names)})"
    elif problems:
        # Conservative: an image of the series without usable geometry could belong to the
        # volume, and a volume with a missing slice is wrong.
        problem = sorted(set(problems))[0]
    else:
        try:
            result: list[Stack] | Rejected = gate(frames)
        except PermanentError as exc:
            # Comparing two images at one position needs their pixel data; an unreadable
            # file makes the series unusable, not the assembler.
            result = Rejected(str(exc))
        if isinstance(result, Rejected):
            problem = result.reason
        else:
            stacks = tuple(result)
    return Series(
        series_uid=series_uid,
        number=_series_number(first),
        modality=_text(first, "Modality").upper(),
        description=_text(first, "SeriesDescription"),
        body_part=_text(first, "BodyPartExamined"),
        image_types=frozenset(_image_type(ds) for _, ds in members),
        contrast=any(_has_contrast(ds) for _, ds in members),
        sop_classes=dict(sop_classes),
        stacks=stacks,
        problem=problem,
        syntaxes=frozenset(syntaxes),
        members=tuple(members),
    )


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "no SOP class")


def _matches(value: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching value (case-insensitive glob), or None."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(value.upper(), pattern.upper()):
            return pattern
    return None


def _header_reason(rules: SelectRules, series: Series) -> str:
    """Why the series' headers fail the series-level rules, or "" if they pass."""
    if series.modality not in rules.modalities:
        return f"modality {series.modality or 'missing'} is not {'/'.join(rules.modalities)}"
    if rules.body_parts and _matches(series.body_part, rules.body_parts) is None:
        return f"BodyPartExamined {series.body_part or '(empty)'!r} matches no body_parts pattern"
    include = rules.series_description_include
    if include and _matches(series.description, include) is None:
        return "SeriesDescription matches no include pattern"
    if (hit := _matches(series.description, rules.series_description_exclude)) is not None:
        return f"SeriesDescription matches exclude pattern {hit!r}"
    if rules.contrast == "with" and not series.contrast:
        return "no contrast agent recorded (rule: contrast = with)"
    if rules.contrast == "without" and series.contrast:
        return "contrast agent recorded (rule: contrast = without)"
    return ""


def _stack_reason(rules: SelectRules, stack: Stack) -> str:
    if rules.orientation != "any" and stack.orientation != rules.orientation:
        return f"{stack.orientation} stack, the model takes {rules.orientation}"
    if len(stack.frames) < rules.min_slices:
        return f"{len(stack.frames)} slices, fewer than min_slices {rules.min_slices}"
    thickness = stack.thickness
    limit = rules.max_slice_thickness_mm
    if limit is not None and thickness is not None and thickness > limit + 1e-6:
        return f"slice thickness {thickness:g} mm exceeds max_slice_thickness_mm {limit:g}"
    instances = {f.path for f in stack.frames}
    if len(instances) > 1 and any(_is_multiframe(f) for f in stack.frames):
        # A SEG references one multi-frame source or single-frame ones (PS3.3 C.8.20.1).
        return "the stack spans several multi-frame instances"
    return ""


def _is_multiframe(frame: Frame) -> bool:
    return frame.sop_class_uid not in SINGLE_FRAME_SOP_CLASSES


def judge(rules: SelectRules, series: Series) -> Verdict:
    """Whether a model with these rules takes the series, and which stack (the largest fit)."""
    if not series.is_image:
        return Verdict(series, None, series.problem or "not an image series")
    reason = _header_reason(rules, series)
    if reason:
        return Verdict(series, None, reason)
    kept, note = _by_image_type(rules, series)
    if kept is None:
        return Verdict(series, None, note)
    if kept.problem:
        return Verdict(series, None, kept.problem, note)
    missing = sorted(s for s in kept.syntaxes if s and decoder_for(s) is None)
    if missing:
        return Verdict(series, None, no_decoder_reason(missing[0]), note)
    reasons = []
    for stack in kept.stacks:  # largest first
        why = _stack_reason(rules, stack)
        if not why:
            return Verdict(series, stack, "", note)
        reasons.append(why)
    return Verdict(series, None, reasons[0] if reasons else "no stack", note)


def _image_type_reason(rules: SelectRules, image_type: str) -> str:
    """Why the ImageType rules leave an instance out, or "" when they take it."""
    include = rules.image_type_include
    if include and _matches(image_type, include) is None:
        return "ImageType matches no include pattern"
    if (hit := _matches(image_type, rules.image_type_exclude)) is not None:
        return f"ImageType {image_type} matches exclude pattern {hit!r}"
    return ""


def _by_image_type(rules: SelectRules, series: Series) -> tuple[Series | None, str]:
    """The series without the image instances its ImageType rules leave out, and a note of
    them; (None, why) when they leave out every one, as a series-level rule would.

    ImageType describes one instance, not the series: a scout saved into an axial series
    (PS3.3 C.8.2.1.1.1, LOCALIZER) is dropped, and the rest goes on to the geometry gate.
    """
    dropped: dict[Path, str] = {}
    images = 0
    for path, ds in series.members:
        if _text(ds, "SOPClassUID") not in IMAGE_SOP_CLASSES:
            continue
        images += 1
        if why := _image_type_reason(rules, _image_type(ds)):
            dropped[path] = why
    if not dropped:
        return series, ""
    counts: dict[str, int] = defaultdict(int)
    for why in dropped.values():
        counts[why] += 1
    if len(dropped) == images:
        return None, sorted(counts)[0]
    note = "; ".join(
        f"{plural(count, 'instance')} dropped: {why}" for why, count in sorted(counts.items())
    )
    key = frozenset(dropped)
    narrowed = series._narrowed.get(key)
    if narrowed is None:
        rest = [(path, ds) for path, ds in series.members if path not in key]
        narrowed = series._narrowed[key] = _series(series.series_uid, rest)
    return narrowed, note


def _rank(verdict: Verdict) -> tuple[int, float, str]:
    # Most slices first; ties to the lowest SeriesNumber, then the UID, so the choice is stable.
    assert verdict.stack is not None
    number = verdict.series.number
    return (
        -len(verdict.stack.frames),
        math.inf if number is None else number,
        verdict.series.series_uid,
    )


def choose(model: ModelSettings, series: Sequence[Series]) -> ModelChoice:
    """The series and stack `model` takes from a study, or the specific reason it takes none."""
    verdicts = tuple(judge(model.select, s) for s in series)
    fits = sorted((v for v in verdicts if v.stack is not None), key=_rank)
    if fits:
        best = fits[0]
        assert best.stack is not None
        frames = tuple(FrameRef(f.path, f.index) for f in best.stack.frames)
        return ModelChoice(
            model.name, ModelInput(model.name, best.series.series_uid, frames), best.note, verdicts
        )
    return ModelChoice(model.name, None, _why_none(model, verdicts), verdicts)


def _why_none(model: ModelSettings, verdicts: Sequence[Verdict]) -> str:
    modalities = model.select.modalities
    wanted = [v for v in verdicts if v.series.is_image and v.series.modality in modalities]
    if not wanted:
        images = sorted({v.series.modality or "?" for v in verdicts if v.series.is_image})
        others = sorted({v.series.modality or "?" for v in verdicts if not v.series.is_image})
        present = (
            f"modalities: {', '.join(images)}"
            if images
            else f"no image series; other objects: {', '.join(others) or 'none'}"
        )
        return f"{model.name}: no {'/'.join(modalities)} series ({present})"
    # The largest series first: its reason is the one a user needs.
    wanted.sort(key=lambda v: -v.series.size)
    details = "; ".join(
        f"{v.series.label()}: {v.reason}" + (f" ({v.note})" if v.note else "") for v in wanted[:3]
    )
    more = f"; and {len(wanted) - 3} more" if len(wanted) > 3 else ""
    return f"{model.name}: {details}{more}"


def select(headers: Mapping[Path, Dataset], models: Sequence[ModelSettings]) -> list[ModelChoice]:
    """Each model's choice for a study, in the configured order."""
    series = describe(headers)
    return [choose(model, series) for model in models]
