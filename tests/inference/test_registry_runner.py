"""The model registry, device choice and the per-segment measurements of run_model."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.domain import Code, ModelIdentity, SegmentSpec
from agent.errors import ConfigError, PermanentError
from agent.inference import runner
from agent.inference.registry import (
    BUILTIN,
    get_model,
    model_names,
    preload,
    with_package_rules,
)
from agent.inference.runner import pick_device, run_model
from agent.inference.volume import Volume
from agent.models.runner import PackagedModel
from agent.roles import with_device
from agent.settings import ModelSettings, SelectRules, Settings

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
    assert isinstance(model, PackagedModel)
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


def test_preload_names_a_broken_package(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.toml").write_text("manifest_version = 1\n")
    entry = ModelSettings(name="organs", package=folder)
    with pytest.raises(ConfigError, match=r"\[\[models\]\] organs: .*model.toml"):
        preload([entry])


def test_preload_puts_each_network_on_its_device(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO):
        preload([ModelSettings(name="ct-tissue"), ModelSettings(name="ct-tissue", device="cuda")])
    assert "model ct-tissue ready on cpu" in caplog.text
    # A worker on a host without the named GPU still starts; its studies are retried.
    assert "model ct-tissue not preloaded: model ct-tissue is configured for CUDA" in caplog.text


def test_package_rules_apply_unless_the_entry_sets_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "mr-model"
    shutil.copytree(BUILTIN / "ct-tissue", folder)
    text = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(text.replace('modalities = ["CT"]', 'modalities = ["MR"]'))
    own = ModelSettings(name="a", package=folder)
    overridden = ModelSettings(name="b", package=folder, select=SelectRules(modalities=("CT",)))
    builtin = ModelSettings(name="ct-tissue")
    a, b, c = with_package_rules([own, overridden, builtin])
    assert (a.select.modalities, b.select.modalities, c.select.modalities) == (
        ("MR",),
        ("CT",),
        ("CT",),
    )


def test_worker_device_replaces_auto_only() -> None:
    settings = Settings(
        models=(ModelSettings(name="a"), ModelSettings(name="b", device="cpu")),
    )
    assert with_device(settings, None) is settings
    changed = with_device(settings, "cuda:1")
    assert [m.device for m in changed.models] == ["cuda:1", "cpu"]
