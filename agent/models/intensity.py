"""A package's intensity preprocessing: clip to a window, then normalise."""

from __future__ import annotations

import torch

from agent.models.manifest import PreprocessingInfo


def preprocess_intensity(volume: torch.Tensor, info: PreprocessingInfo) -> torch.Tensor:
    """`volume` (any shape, e.g. HU for CT) clipped and normalised as the manifest says."""
    out = volume.float()
    if info.clip is not None:
        out = out.clamp(info.clip[0], info.clip[1])
    if info.normalisation == "zscore":
        if info.mean is not None and info.std is not None:
            mean, std = info.mean, info.std
        else:
            mean, std = float(out.mean()), float(out.std())
        # A constant volume has no spread; dividing by zero would give NaN everywhere.
        out = (out - mean) / max(std, 1e-6)
    elif info.normalisation == "minmax":
        if info.clip is not None:
            low, high = info.clip
        else:
            low, high = float(out.min()), float(out.max())
        out = (out - low) / max(high - low, 1e-6)
    return out
