"""The network's grid: axis directions turned as the package asks, spacing resampled, and back."""

from __future__ import annotations

import pytest
import torch

from agent.models.grid import (
    Reorientation,
    reorientation,
    resample,
    resampled_shape,
    resampled_slabs,
)

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# Rows towards the back, columns towards the feet, slices towards the right (as a scanner
# stores a sagittal series: normal = row x column = -x).
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))
# An axial stack tilted 20 degrees about x: still nearest to axial.
OBLIQUE = ((1.0, 0.0, 0.0), (0.0, 0.9397, 0.3420), (0.0, -0.3420, 0.9397))


def test_axial_lps_is_left_alone() -> None:
    turn = reorientation(AXIAL, "LPS")
    assert turn.identity
    assert reorientation(OBLIQUE, "LPS").identity


def test_ras_reverses_y_and_x() -> None:
    assert reorientation(AXIAL, "RAS") == Reorientation((0, 1, 2), (False, True, True))


def test_sagittal_becomes_axial_planes() -> None:
    turn = reorientation(SAGITTAL, "LPS")
    # Network z (towards the head) is the source row axis (towards the feet): reversed;
    # network y (back) the source columns; network x (left) the slices (towards the right).
    assert turn == Reorientation((1, 2, 0), (True, False, True))
    assert turn.spacing((3.0, 0.5, 0.6)) == (0.5, 0.6, 3.0)
    assert turn.shape((10, 20, 30)) == (20, 30, 10)


@pytest.mark.parametrize("axes", [AXIAL, SAGITTAL, CORONAL, OBLIQUE], ids=str)
@pytest.mark.parametrize("target", ["LPS", "RAS"])
def test_undo_restores_the_source(axes: tuple, target: str) -> None:
    turn = reorientation(axes, target)  # type: ignore[arg-type]
    source = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    turned = turn.apply(source)
    assert tuple(turned.shape) == (2, *turn.shape((3, 4, 5)))
    assert torch.equal(turn.undo(turned), source)


def test_a_voxel_lands_where_its_patient_direction_says() -> None:
    # In a coronal stack the voxel nearest the head is in the first row; after turning to
    # LPS it must be in the last network z plane (z runs towards the head).
    source = torch.zeros(4, 5, 6)  # (slices, rows, columns)
    source[2, 0, 3] = 1.0
    turned = reorientation(CORONAL, "LPS").apply(source)
    z, y, x = (int(i) for i in torch.nonzero(turned)[0])
    assert z == turned.shape[0] - 1
    assert (y, x) == (2, 3)  # slices run towards the back; columns to the left, unchanged


def test_resampled_shape_keeps_the_extent() -> None:
    assert resampled_shape((300, 512, 512), (1.0, 0.7, 0.7), (1.5, 1.5, 1.5)) == (200, 239, 239)
    assert resampled_shape((1, 4, 4), (5.0, 1.0, 1.0), (1.0, 100.0, 100.0)) == (5, 1, 1)


def test_resample_round_trip_keeps_a_smooth_volume() -> None:
    z, y, x = torch.meshgrid(
        torch.linspace(0, 1, 20), torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij"
    )
    volume = (z + y + x)[None]
    there = resample(volume, (40, 20, 20))
    back = resample(there, (20, 40, 40))
    assert tuple(back.shape) == (1, 20, 40, 40)
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert torch.allclose(back[inner], volume[inner], atol=0.03)
    assert resample(volume, (20, 40, 40)) is volume


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((7, 9, 11), (13, 5, 11)),
        ((20, 8, 8), (9, 16, 16)),
        ((5, 6, 7), (5, 6, 7)),
        ((1, 4, 4), (3, 4, 4)),
    ],
    ids=["mixed", "down-z up-yx", "same", "one plane"],
)
def test_slabs_are_trilinear(
    source: tuple[int, int, int], target: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.models import grid

    monkeypatch.setattr(grid, "SLAB_BYTES", 3 * target[1] * target[2] * 4 * 4)  # 4 planes
    tensor = torch.rand((3, *source), generator=torch.Generator().manual_seed(0))
    expected = resample(tensor, target)
    pieces = list(resampled_slabs(tensor, target))
    assert [first for first, _ in pieces] == list(range(0, target[0], 4))
    got = torch.cat([slab for _, slab in pieces], dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
