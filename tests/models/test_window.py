"""Sliding-window blending: a constant stays constant, and patches land where they belong."""

from __future__ import annotations

import itertools

import pytest
import torch

from agent.models.window import gaussian_weight, patch_starts, sliding_window


def test_patch_starts_cover_the_axis() -> None:
    assert patch_starts(10, 16, 0.5) == [0]
    assert patch_starts(16, 16, 0.5) == [0]
    starts = patch_starts(40, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 40 - 16
    assert all(b - a <= 8 for a, b in itertools.pairwise(starts))


def test_weight_is_one_at_the_centre_and_never_zero() -> None:
    weight = gaussian_weight((9, 8, 7), torch.device("cpu"))
    assert float(weight.max()) == pytest.approx(1.0, abs=0.02)
    assert float(weight.min()) > 0


def test_constant_output_blends_to_a_constant() -> None:
    def constant(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 2, *batch.shape[2:]), 3.5)

    volume = torch.zeros(1, 21, 30, 17)
    with torch.inference_mode():
        out = sliding_window(volume, constant, patch_size=(8, 8, 8), overlap=0.5, batch_size=3)
    assert out.shape == (2, 21, 30, 17)
    assert torch.allclose(out, torch.full_like(out, 3.5))


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_position_dependent_output_is_stitched_in_place(batch_size: int) -> None:
    # Each voxel holds its own coordinates; a network that echoes its patch must give back the
    # whole volume, which holds only if every patch is put back where it was cut.
    z, y, x = torch.meshgrid(torch.arange(19), torch.arange(26), torch.arange(13), indexing="ij")
    # Small enough for float32 to hold exactly; one voxel's shift on any axis changes it by >= 1.
    volume = (z * 1000 + y * 30 + x).float()[None]
    calls: list[int] = []

    def echo(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return torch.cat([batch, -batch], dim=1)

    with torch.inference_mode():
        out = sliding_window(
            volume, echo, patch_size=(8, 10, 16), overlap=0.25, batch_size=batch_size
        )
    assert out.shape == (2, 19, 26, 13)  # x (13) was padded to the patch (16) and cut back
    assert torch.allclose(out[0], volume[0], rtol=0, atol=0.05)
    assert torch.allclose(out[1], -volume[0], rtol=0, atol=0.05)
    assert max(calls) <= batch_size


def test_wrong_output_shape_is_named() -> None:
    def shrinks(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 1:]

    with pytest.raises(ValueError, match="expected"):
        sliding_window(
            torch.zeros(1, 8, 8, 8), shrinks, patch_size=(4, 4, 4), overlap=0.5, batch_size=2
        )
