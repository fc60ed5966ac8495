"""The model registry, device choice and the per-segment measurements of run_model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from agent.domain import Code, ModelIdentity, SegmentSpec
from agent.errors import PermanentError
from agent.inference import runner
from agent.inference.models.ct_tissue import CtTissueModel
from agent.inference.registry import get_model, model_names
from agent.inference.runner import pick_device, run_model
from agent.inference.volume import Volume

CODE = Code("1", "99TEST", "test")
IDENTITY = ModelIdentity("fake", "0", "tests", "2.25.1")


@dataclass(frozen=True)
class FakeModel:
    """Returns fixed masks, to check what run_model does with them."""

    masks: np.ndarray
    identity: ModelIdentity = IDENTITY

    @property
    def segments(self) -> tuple[SegmentSpec, ...]:
        return tuple(
            SegmentSpec(i + 1, f"s{i + 1}", CODE, CODE, f"fake s{i + 1}")
            for i in range(self.masks.shape[0])
        )

    def predict(self, volume: Volume, device: torch.device) -> np.ndarray:
        return self.masks


def small_volume() -> Volume:
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    return Volume(hu=hu, spacing=(2.0, 0.5, 0.5))


def test_known_models_are_listed_and_built_once() -> None:
    assert "ct-tissue" in model_names()
    model = get_model("ct-tissue")
    assert isinstance(model, CtTissueModel)
    assert get_model("ct-tissue") is model
    assert model.identity.name == "ct-tissue"


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(PermanentError, match=r"unknown model 'liver-9000'.*ct-tissue"):
        get_model("liver-9000")


def test_pick_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")


def test_measurements_count_voxels_and_average_hu() -> None:
    volume = small_volume()
    masks = np.zeros((3, 2, 3, 4), dtype=bool)
    masks[0] = True
    masks[1, 1, 2, :] = True  # hu 20, 21, 22, 23
    result, measurements = run_model(FakeModel(masks), volume, torch.device("cpu"))
    assert result is masks
    voxel_ml = 2.0 * 0.5 * 0.5 / 1000.0
    everything, row, empty = measurements
    assert (everything.segment_number, everything.voxel_count) == (1, 24)
    assert everything.volume_ml == pytest.approx(24 * voxel_ml)
    assert everything.mean_hu == pytest.approx(11.5)
    assert (row.segment_number, row.voxel_count, row.mean_hu) == (2, 4, 21.5)
    assert row.volume_ml == pytest.approx(4 * voxel_ml)
    assert (empty.voxel_count, empty.volume_ml) == (0, 0.0)
    assert math.isnan(empty.mean_hu)


def test_run_model_defaults_to_the_picked_device(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []

    class Recording(FakeModel):
        def predict(self, volume: Volume, device: torch.device) -> np.ndarray:
            seen.append(device)
            return self.masks

    monkeypatch.setattr(runner, "pick_device", lambda: torch.device("meta"))
    run_model(Recording(np.zeros((1, 2, 3, 4), dtype=bool)), small_volume())
    assert seen == [torch.device("meta")]


@pytest.mark.parametrize(
    "masks",
    [np.zeros((2, 2, 3, 4), dtype=np.uint8), np.zeros((2, 2, 3, 5), dtype=bool)],
    ids=["not bool", "wrong shape"],
)
def test_malformed_model_output_is_a_permanent_error(masks: np.ndarray) -> None:
    with pytest.raises(PermanentError, match="model fake returned"):
        run_model(FakeModel(masks), small_volume(), torch.device("cpu"))
