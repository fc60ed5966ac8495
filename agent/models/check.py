"""Run a loaded package once on a synthetic volume: does it load, run and answer in shape?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agent.errors import PermanentError
from agent.inference.volume import Volume
from agent.models.manifest import PackageError, PackageManifest
from agent.models.package import ModelPackage
from agent.models.runner import run_package


@dataclass(frozen=True)
class CheckResult:
    shape: tuple[int, int, int]  # (z, y, x) of the synthetic volume
    output_channels: int  # the outputs the manifest names, all of which the network gave
    seconds: float  # preprocessing, the network and postprocessing; not loading
    labels_found: tuple[int, ...]  # the label indices some voxel was given


def synthetic_volume(manifest: PackageManifest, seed: int = 0) -> Volume:
    """A volume one and a half patches wide on each axis at the package's spacing (so that
    patches overlap and are blended), of random intensities within the clip window (else
    CT's range); a whole-volume network gets 48 voxels a side."""
    patch = manifest.inference.patch_size or (32, 32, 32)
    shape = tuple(p + p // 2 for p in patch)
    low, high = manifest.preprocessing.clip or (-1024.0, 2048.0)
    rng = np.random.default_rng(seed)
    hu = (low + rng.random(shape, dtype=np.float32) * (high - low)).astype(np.float32)
    spacing = manifest.preprocessing.spacing_mm or (1.0, 1.0, 1.0)
    return Volume(hu=hu, spacing=spacing)


def check_package(package: ModelPackage) -> CheckResult:
    """Run the package once, on the CPU; PackageError when it fails or answers out of shape."""
    manifest = package.manifest
    volume = synthetic_volume(manifest)
    try:
        with torch.inference_mode():
            run = run_package(manifest, package.network, volume, torch.device("cpu"))
    except PackageError:
        raise
    except PermanentError as exc:  # the runner names what the network did wrong
        raise PackageError(f"{package.source}: {exc}") from None
    found = tuple(
        o.index for o, mask in zip(manifest.outputs, run.masks, strict=True) if mask.any()
    )
    z, y, x = volume.hu.shape
    return CheckResult(
        shape=(z, y, x),
        output_channels=manifest.output_channels,
        seconds=run.times.total,
        labels_found=found,
    )
