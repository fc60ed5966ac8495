"""Run a loaded package once on a synthetic volume: does it load, run and answer in shape?"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from agent.models.intensity import preprocess_intensity
from agent.models.manifest import PackageError, PackageManifest
from agent.models.package import ModelPackage
from agent.models.window import sliding_window


@dataclass(frozen=True)
class CheckResult:
    shape: tuple[int, int, int]  # (z, y, x) of the synthetic volume
    output_channels: int
    seconds: float  # the sliding-window run alone, not loading or preprocessing
    labels_found: tuple[int, ...]  # the label indices some voxel was given


def synthetic_volume(manifest: PackageManifest, seed: int = 0) -> torch.Tensor:
    """A (C, z, y, x) volume one and a half patches wide on each axis, so that patches
    overlap and are blended, of random intensities within the clip window (else CT's range)."""
    patch = manifest.inference.patch_size
    shape = tuple(p + p // 2 for p in patch)
    low, high = manifest.preprocessing.clip or (-1024.0, 2048.0)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((manifest.input.channels, *shape), generator=generator)
    return low + noise * (high - low)


def label_map(scores: torch.Tensor, manifest: PackageManifest) -> torch.Tensor:
    """(K, z, y, x) scores to a (z, y, x) label map (for sigmoid outputs, the highest label
    wins where labels overlap)."""
    if manifest.inference.activation == "softmax":
        return scores.argmax(dim=0)
    labels = torch.zeros(scores.shape[1:], dtype=torch.long, device=scores.device)
    for index in range(1, scores.shape[0] + 1):
        labels[torch.sigmoid(scores[index - 1]) > 0.5] = index
    return labels


def check_package(package: ModelPackage) -> CheckResult:
    """Run the network once, on the CPU; PackageError when it fails or answers out of shape."""
    manifest = package.manifest
    volume = preprocess_intensity(synthetic_volume(manifest), manifest.preprocessing)
    inference = manifest.inference
    started = time.monotonic()
    try:
        with torch.inference_mode():
            scores = sliding_window(
                volume,
                package.network,
                patch_size=inference.patch_size,
                overlap=inference.overlap,
                batch_size=inference.batch_size,
            )
    except Exception as exc:  # the package's network: whatever it raises is its failure
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        raise PackageError(f"{package.source}: the network failed: {reason}") from None
    seconds = time.monotonic() - started
    channels = int(scores.shape[0])
    if channels < manifest.output_channels:
        raise PackageError(
            f"{package.source}: the network gives {channels} output channels; outputs up to "
            f"index {manifest.outputs[-1].index} need {manifest.output_channels}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise PackageError(f"{package.source}: the network gave NaN or infinite scores")
    found = torch.unique(label_map(scores, manifest))
    return CheckResult(
        shape=(int(volume.shape[1]), int(volume.shape[2]), int(volume.shape[3])),
        output_channels=channels,
        seconds=seconds,
        labels_found=tuple(int(v) for v in found if int(v) > 0),
    )
