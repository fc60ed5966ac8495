"""Run a model on a volume on the best device and measure what each segment contains."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from agent.domain import Measurement
from agent.errors import PermanentError, RetryableError
from agent.inference.volume import Volume

if TYPE_CHECKING:
    from agent.inference.registry import Model

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """CUDA if a GPU is usable, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(choice: str, model: str) -> torch.device:
    """The device a `[[models]] device` setting means on this host.

    "auto" takes the GPU when there is one and falls back to the CPU with a warning (a study
    then takes minutes instead of seconds, but is not lost). "cuda" or "cuda:N" insist: a
    worker without that GPU leaves the study to be retried (it may be on the wrong host, or
    the driver may come back).
    """
    if choice == "auto":
        device = pick_device()
        if device.type == "cpu":
            log.warning("model %s: no CUDA device here; running on the CPU (slow)", model)
        return device
    device = torch.device(choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RetryableError(f"model {model} is configured for CUDA, which is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RetryableError(
                f"model {model} is configured for {choice}; this host has {count} CUDA devices"
            )
    return device


def measure(mask: np.ndarray, volume: Volume, segment_number: int) -> Measurement:
    """Volume (voxel count x voxel volume) and mean HU of one mask; mean is NaN when empty."""
    count = int(np.count_nonzero(mask))
    dz, dy, dx = volume.spacing
    voxel_ml = dz * dy * dx / 1000.0  # mm3 -> ml
    mean = float(volume.hu[mask].mean(dtype=np.float64)) if count else math.nan
    return Measurement(
        segment_number=segment_number,
        volume_ml=count * voxel_ml,
        mean_hu=mean,
        voxel_count=count,
    )


def run_model(
    model: Model, volume: Volume, device: torch.device | None = None
) -> tuple[np.ndarray, tuple[Measurement, ...]]:
    """The model's bool masks (segments, z, y, x) and one Measurement per segment."""
    device = device or pick_device()
    start = time.perf_counter()
    with torch.inference_mode():
        masks = model.predict(volume, device)
    expected = (len(model.segments), *volume.hu.shape)
    if masks.shape != expected or masks.dtype != np.bool_:
        raise PermanentError(
            f"model {model.identity.name} returned {masks.dtype} masks of shape {masks.shape}, "
            f"expected bool {expected}"
        )
    measurements = tuple(
        measure(masks[i], volume, spec.number) for i, spec in enumerate(model.segments)
    )
    log.info(
        "model %s %s on %s: %s in %.2f s",
        model.identity.name,
        model.identity.version,
        device,
        ", ".join(
            f"{s.label} {m.volume_ml:.1f} ml"
            for s, m in zip(model.segments, measurements, strict=True)
        ),
        time.perf_counter() - start,
    )
    return masks, measurements
