"""The model package manifest (`model.toml`): what a network is, takes, does and outputs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.domain import Code, SegmentSpec
from agent.errors import PermanentError
from agent.models.color import rgb_to_dicom_lab
from agent.settings import SelectRules, _describe, _Section

MANIFEST_NAME = "model.toml"
MANIFEST_VERSION = 1

# PS3.5 6.2: LO is at most 64 characters and has no backslash; name and version go into LO
# elements (Manufacturer's Model Name, Software Versions) of the Contributing Equipment item.
LongString = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f]+$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# "module:function", the module a .py file in the package folder (no dots: no sub-packages).
EntryPoint = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$")]
Positive3 = tuple[
    Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
]
Byte = Annotated[int, Field(ge=0, le=255)]

# What the SR can report per segment (TID 1411 measurements): its volume, and its mean
# intensity (attenuation in HU for CT).
MeasurementName = Literal["volume", "mean"]


class PackageError(PermanentError):
    """A model package is unusable; the message names the file and the problem."""


class ModelInfo(_Section):
    name: LongString
    version: LongString
    description: str = ""
    # Shown to people and in the SR; e.g. "research use, not for diagnosis".
    intended_use: Annotated[str, Field(min_length=1)]
    manufacturer: LongString = "pacs-agent"


class WeightsInfo(_Section):
    """The network: a TorchScript file, a `torch.export` program (.pt2), or Python code."""

    format: Literal["torchscript", "export", "python"]
    # The weights (for "python", whatever the entry point reads; its SHA-256 still names it).
    file: Annotated[str, Field(min_length=1)]
    # When given, the file must have this SHA-256 (lower-case hex).
    sha256: Sha256 | None = None
    # For "python": `module:function` in the package folder; called with the package folder,
    # it returns the network, a callable from (B, C, z, y, x) to (B, K, z, y, x).
    entry_point: EntryPoint | None = None

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a path inside the package")
        return value

    @model_validator(mode="after")
    def _entry_point(self) -> WeightsInfo:
        if (self.format == "python") != (self.entry_point is not None):
            raise ValueError('entry_point is given with format = "python", and only then')
        return self


class InputInfo(_Section):
    channels: Annotated[int, Field(ge=1)] = 1
    select: SelectRules = SelectRules()


class PreprocessingInfo(_Section):
    # (z, y, x) in mm the volume is resampled to; unset: as acquired.
    spacing_mm: tuple[float, float, float] | None = None
    # Axis order and directions of the network's (z, y, x): DICOM patient axes (LPS) as
    # pacs-agent stacks them, or flipped to RAS as nnU-Net and MONAI models often expect.
    orientation: Literal["LPS", "RAS"] = "LPS"
    # Intensities are clipped to [low, high] first (for CT, a HU window).
    clip: tuple[float, float] | None = None
    # "zscore": (v - mean) / std with the given values, or the volume's own when unset;
    # "minmax": the clip window (or the volume's range) mapped to 0..1.
    normalisation: Literal["none", "zscore", "minmax"] = "none"
    mean: float | None = None
    std: Annotated[float, Field(gt=0)] | None = None

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, value: tuple[float, float, float] | None) -> tuple[float, ...] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("every spacing must be positive")
        return value

    @model_validator(mode="after")
    def _window(self) -> PreprocessingInfo:
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError("clip is [low, high] with low < high")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together")
        if self.mean is not None and self.normalisation != "zscore":
            raise ValueError('mean and std are for normalisation = "zscore"')
        return self


class InferenceInfo(_Section):
    # "sliding_window": patches of patch_size, blended; "whole": the network takes the whole
    # (preprocessed) volume in one call, for networks that need all of it (connected
    # components, a classical algorithm) or are small enough.
    mode: Literal["sliding_window", "whole"] = "sliding_window"
    patch_size: Positive3 | None = None  # (z, y, x) voxels; sliding_window needs it
    # Fraction of a patch that neighbouring patches share, along each axis.
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    batch_size: Annotated[int, Field(ge=1)] = 1
    # On CUDA, "float16" and "bfloat16" run the network under autocast (mixed precision);
    # on the CPU the network runs in float32 whatever this says.
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    # "softmax": channel 0 is background and each voxel takes its largest channel;
    # "sigmoid": channel k-1 is label k, set where above 0.5 (labels may overlap).
    # A network may return bool masks instead of scores: channel k-1 is then label k's mask.
    activation: Literal["softmax", "sigmoid"] = "softmax"
    # Python networks only: called as network(x, spacing) with the (z, y, x) spacing in mm of
    # the grid they are given, for algorithms that measure in millimetres.
    spacing_argument: bool = False

    @model_validator(mode="after")
    def _patch(self) -> InferenceInfo:
        if self.mode == "sliding_window" and self.patch_size is None:
            raise ValueError('mode = "sliding_window" needs patch_size')
        return self


class CodeInfo(_Section):
    value: Annotated[str, Field(min_length=1, max_length=16)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)] = "SCT"
    meaning: LongString

    @property
    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class OutputInfo(_Section):
    """One label of the network's output and how its segment is coded (PS3.3 C.8.20.2)."""

    index: Annotated[int, Field(ge=1)]  # the label value; 0 is background
    label: LongString
    category: CodeInfo  # CID 7150 Segmentation Property Category
    type: CodeInfo  # CID 7151 Segmentation Property Type
    # 8-bit sRGB as people pick colours; SEG gets it as RecommendedDisplayCIELabValue.
    color: tuple[Byte, Byte, Byte] | None = None
    measurements: tuple[MeasurementName, ...] = ("volume",)
    tracking_id: LongString | None = None

    @property
    def dicom_lab(self) -> tuple[int, int, int] | None:
        return None if self.color is None else rgb_to_dicom_lab(self.color)


class PackageManifest(_Section):
    """Everything `model.toml` says; valid once constructed."""

    manifest_version: Literal[1]
    model: ModelInfo
    weights: WeightsInfo
    input: InputInfo = InputInfo()
    preprocessing: PreprocessingInfo = PreprocessingInfo()
    inference: InferenceInfo
    outputs: Annotated[tuple[OutputInfo, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> PackageManifest:
        if self.inference.spacing_argument and self.weights.format != "python":
            raise ValueError('inference.spacing_argument is for format = "python" networks')
        if self.input.channels != 1:
            # A model is given one series; several (e.g. MR sequences) would need the study's
            # series matched to channels, which packages cannot state yet.
            raise ValueError(f"input.channels is {self.input.channels}; pacs-agent gives 1")
        return self

    @field_validator("outputs")
    @classmethod
    def _indices(cls, value: tuple[OutputInfo, ...]) -> tuple[OutputInfo, ...]:
        indices = [o.index for o in value]
        if indices != sorted(set(indices)):
            raise ValueError(f"output indices must be unique and ascending, got {indices}")
        return value

    def segments(self) -> tuple[SegmentSpec, ...]:
        """The outputs as SEG segments, numbered 1.. in the order of their label index."""
        return tuple(
            SegmentSpec(
                number=number,
                label=o.label,
                category=o.category.code,
                type=o.type.code,
                tracking_id=o.tracking_id or f"{self.model.name} {o.label.lower()}",
                color_lab=o.dicom_lab,
                measurements=o.measurements,
            )
            for number, o in enumerate(self.outputs, start=1)
        )

    @property
    def output_channels(self) -> int:
        """The fewest channels the network's output must have for these labels."""
        top = self.outputs[-1].index
        return top + 1 if self.inference.activation == "softmax" else top


def parse_manifest(text: str, source: str) -> PackageManifest:
    """Validate manifest text; PackageError names `source` and the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PackageError(f"{source}: not valid TOML: {exc}") from None
    try:
        return PackageManifest.model_validate(raw)
    except ValidationError as exc:
        raise PackageError(_describe(exc, source)) from None


def read_manifest(path: Path) -> PackageManifest:
    """Read and validate a `model.toml`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PackageError(f"{path}: cannot read manifest: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PackageError(f"{path}: manifest is not UTF-8 text") from None
    return parse_manifest(text, str(path))
