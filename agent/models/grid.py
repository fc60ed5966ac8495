"""The network's grid: a volume turned to the package's axis directions, resampled to its spacing,
and the way back to the source grid, as torch operations on whatever device the tensors are on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Vector = tuple[float, float, float]
Shape3 = tuple[int, int, int]
Spacing = tuple[float, float, float]

# The patient axis (DICOM LPS: 0 = x towards the left, 1 = y towards the back, 2 = z towards the
# head) each network axis (z, y, x) runs along, and its direction there. "LPS" is how DICOM
# images of an axial CT are stored; "RAS" (nnU-Net and MONAI models read from NIfTI often
# expect it) keeps the axis order and reverses y and x to point anterior and right.
_PATIENT_AXIS = (2, 1, 0)
_SIGNS: dict[str, tuple[int, int, int]] = {"LPS": (1, 1, 1), "RAS": (1, -1, -1)}


@dataclass(frozen=True)
class Reorientation:
    """Axis permutation and flips from the source array (z, y, x) to the network's (z, y, x).

    `order[t]` is the source axis that becomes network axis t; `flip[t]` reverses network axis t
    after the permutation. Both act on the last three dimensions, so channels ride along.
    """

    order: Shape3
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        lead = tensor.dim() - 3
        out = tensor.permute(*range(lead), *(lead + a for a in self.order))
        dims = [lead + t for t in range(3) if self.flip[t]]
        return out.flip(dims) if dims else out

    def undo(self, tensor: torch.Tensor) -> torch.Tensor:
        lead = tensor.dim() - 3
        dims = [lead + t for t in range(3) if self.flip[t]]
        out = tensor.flip(dims) if dims else tensor
        inverse = [self.order.index(a) for a in range(3)]
        return out.permute(*range(lead), *(lead + t for t in inverse))

    def spacing(self, spacing: Spacing) -> Spacing:
        """The source (z, y, x) spacing in the network's axis order."""
        return (spacing[self.order[0]], spacing[self.order[1]], spacing[self.order[2]])

    def shape(self, shape: Shape3) -> Shape3:
        return (shape[self.order[0]], shape[self.order[1]], shape[self.order[2]])


def reorientation(
    axes: tuple[Vector, Vector, Vector], target: Literal["LPS", "RAS"]
) -> Reorientation:
    """How to turn an array whose x, y and z axes run along `axes` (patient LPS directions) so
    that its axes run as `target` says, each source axis going to the patient axis it is
    nearest to (an oblique stack is turned, not resampled, as nibabel's io_orientation does)."""
    x_dir, y_dir, z_dir = axes
    directions = (z_dir, y_dir, x_dir)  # source array axes 0, 1, 2
    pairs = sorted(
        ((abs(directions[a][p]), a, p) for a in range(3) for p in range(3)), reverse=True
    )
    patient_of: dict[int, int] = {}
    used: set[int] = set()
    for _, a, p in pairs:
        if a not in patient_of and p not in used:
            patient_of[a] = p
            used.add(p)
    source_of = {p: a for a, p in patient_of.items()}
    signs = _SIGNS[target]
    order = tuple(source_of[_PATIENT_AXIS[t]] for t in range(3))
    flip = tuple((directions[order[t]][_PATIENT_AXIS[t]] < 0) != (signs[t] < 0) for t in range(3))
    return Reorientation((order[0], order[1], order[2]), (flip[0], flip[1], flip[2]))


def resampled_shape(shape: Shape3, spacing: Spacing, target: Spacing) -> Shape3:
    """The voxel counts that cover the same extent at the target spacing (at least 1 each)."""
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]
    return (out[0], out[1], out[2])


def resample(tensor: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """(C, z, y, x) trilinearly resampled to `shape` (voxel centres aligned, as ITK does)."""
    if tuple(tensor.shape[1:]) == shape:
        return tensor
    # interpolate computes in the input's dtype; half precision loses too much along the way.
    source = tensor if tensor.is_floating_point() else tensor.float()
    out = F.interpolate(source[None], size=shape, mode="trilinear", align_corners=False)
    return out[0]


# Host or device memory a slab of resampled channels may take: the whole source grid for every
# channel would be 33 GB for 105 labels on a 300x512x512 CT.
SLAB_BYTES = 256 * 2**20


def resampled_slabs(tensor: torch.Tensor, shape: Shape3) -> Iterator[tuple[int, torch.Tensor]]:
    """(K, z, y, x) trilinearly resampled to `shape` as F.interpolate does (voxel centres
    aligned), a slab of output z planes at a time: (first z, (K, n, y, x) float32).

    Trilinear is bilinear in-plane and then linear along z, so each source plane is resampled
    in-plane once and each output plane is the blend of two of them: memory stays at a few
    planes per channel, not the whole output grid per channel.
    """
    channels, depth = int(tensor.shape[0]), int(tensor.shape[1])
    out_z, out_y, out_x = shape
    same_plane = tuple(tensor.shape[2:]) == (out_y, out_x)

    def plane(j: int) -> torch.Tensor:
        source = tensor[:, j].float()
        if same_plane:
            return source
        size = (out_y, out_x)
        return F.interpolate(source[None], size=size, mode="bilinear", align_corners=False)[0]

    plane_bytes = channels * out_y * out_x * 4
    slab = max(1, min(out_z, SLAB_BYTES // max(plane_bytes, 1)))
    scale = depth / out_z
    planes: dict[int, torch.Tensor] = {}
    for first in range(0, out_z, slab):
        count = min(slab, out_z - first)
        out = torch.empty(
            (channels, count, out_y, out_x), dtype=torch.float32, device=tensor.device
        )
        for i in range(first, first + count):
            # PyTorch's source index for align_corners=False, clamped at the first plane.
            position = max((i + 0.5) * scale - 0.5, 0.0)
            low = min(int(position), depth - 1)
            high = min(low + 1, depth - 1)
            weight = position - low
            for j in (low, high):
                if j not in planes:
                    planes[j] = plane(j)
            for j in [k for k in planes if k < low]:
                del planes[j]
            if high == low or weight == 0.0:
                out[:, i - first] = planes[low]
            else:
                torch.lerp(planes[low], planes[high], weight, out=out[:, i - first])
        yield first, out
