"""Sliding-window inference: overlapping patches, batched, blended with a Gaussian weight."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

Network = Callable[[torch.Tensor], torch.Tensor]
Shape3 = tuple[int, int, int]

# The Gaussian's sigma as a fraction of the patch size: 1/8, as nnU-Net, so that a voxel near
# a patch's edge (where the network saw little context) counts little beside a centre voxel.
SIGMA_FRACTION = 1.0 / 8.0


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Where patches of `patch` voxels start along an axis of `size` (>= patch), evenly spread
    so that the first starts at 0, the last ends at `size`, and neighbours share at least
    `overlap` of a patch."""
    if size <= patch:
        return [0]
    step = max(1, math.floor(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    span = size - patch
    return [round(i * span / (count - 1)) for i in range(count)]


@functools.cache
def _gaussian_cpu(patch: Shape3) -> torch.Tensor:
    axes = []
    for n in patch:
        centre = (n - 1) / 2.0
        sigma = max(n * SIGMA_FRACTION, 1e-3)
        x = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-((x - centre) ** 2) / (2 * sigma**2)))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    # No voxel may weigh nothing: an edge voxel covered by one patch only must still count.
    weight = torch.clamp(weight, min=1e-3)
    return weight.to(torch.float32)


def gaussian_weight(patch: Shape3, device: torch.device) -> torch.Tensor:
    """The (z, y, x) blending weight of one patch: 1 at its centre, falling towards its edges."""
    return _gaussian_cpu(patch).to(device)


def _positions(shape: Shape3, patch: Shape3, overlap: float) -> Iterator[Shape3]:
    for z in patch_starts(shape[0], patch[0], overlap):
        for y in patch_starts(shape[1], patch[1], overlap):
            for x in patch_starts(shape[2], patch[2], overlap):
                yield (z, y, x)


def sliding_window(
    volume: torch.Tensor,
    network: Network,
    *,
    patch_size: Shape3,
    overlap: float,
    batch_size: int,
    pad_value: float = 0.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Run `network` over `volume` (C, z, y, x) patch by patch; return its (K, z, y, x) output.

    Patches of `patch_size` overlap by `overlap` (a fraction), go to the network
    `batch_size` at a time, and are blended with a Gaussian weight, accumulated in float32 on
    the volume's device. An axis shorter than the patch is padded with `pad_value` at its end.
    The caller chooses the grad mode and autocast; `torch.inference_mode()` for inference.

    `device` is where the network runs, when not the volume's: the volume and the blending
    then stay where they are (host memory when the GPU has too little) and only batches of
    patches go to the network and back.
    """
    if volume.dim() != 4:
        raise ValueError(f"volume must be (C, z, y, x), got shape {tuple(volume.shape)}")
    size = (int(volume.shape[1]), int(volume.shape[2]), int(volume.shape[3]))
    padded = tuple(max(s, p) for s, p in zip(size, patch_size, strict=True))
    if padded != size:
        pad = [0, padded[2] - size[2], 0, padded[1] - size[1], 0, padded[0] - size[0]]
        volume = torch.nn.functional.pad(volume, pad, value=pad_value)
    shape = (padded[0], padded[1], padded[2])
    weight = gaussian_weight(patch_size, volume.device)
    total: torch.Tensor | None = None
    norm = torch.zeros(shape, dtype=torch.float32, device=volume.device)
    positions = list(_positions(shape, patch_size, overlap))
    pz, py, px = patch_size
    for first in range(0, len(positions), batch_size):
        chunk = positions[first : first + batch_size]
        batch = torch.stack([volume[:, z : z + pz, y : y + py, x : x + px] for z, y, x in chunk])
        if device is not None and device != volume.device:
            batch = batch.to(device, non_blocking=True)
        scores = network(batch)
        if scores.device != volume.device:
            scores = scores.to(volume.device)
        if scores.dim() != 5 or tuple(scores.shape[2:]) != patch_size:
            raise ValueError(
                f"the model returned shape {tuple(scores.shape)} for a patch "
                f"{tuple(batch.shape)}; expected (B, K, {pz}, {py}, {px})"
            )
        if total is None:
            total = torch.zeros(
                (scores.shape[1], *shape), dtype=torch.float32, device=volume.device
            )
        for (z, y, x), patch in zip(chunk, scores, strict=True):
            total[:, z : z + pz, y : y + py, x : x + px] += patch.float() * weight
            norm[z : z + pz, y : y + py, x : x + px] += weight
    assert total is not None  # there is always at least one patch
    total /= norm
    return total[:, : size[0], : size[1], : size[2]]
