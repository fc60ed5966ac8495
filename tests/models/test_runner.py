"""The package runner: grid and orientation, the example U-Net end to end, out-of-memory
fallback, precision, devices, and what a misbehaving network is told."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.errors import RetryableError
from agent.inference import runner as inference_runner
from agent.inference.runner import resolve_device
from agent.inference.volume import Volume
from agent.models.manifest import PackageManifest, parse_manifest
from agent.models.package import load_package
from agent.models.runner import (
    NetworkFailed,
    OutOfGpuMemory,
    PackagedModel,
    Plan,
    fallback_plans,
    run_package,
)
from tests.models.packages import manifest_text

CPU = torch.device("cpu")


def ct_like(shape: tuple[int, int, int] = (20, 40, 36), seed: int = 1) -> Volume:
    """A ball of 250 HU in 150 HU, with noise, at 2 x 1 x 1 mm (inside the clip window, so
    that its edge sits half way between the two in the network's minmax 0..1)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = [n / 2 for n in shape]
    inside = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < 15**2
    noise = np.random.default_rng(seed).normal(0, 5, shape)
    hu = np.where(inside, 250.0, -150.0) + noise
    return Volume(hu=hu.astype(np.float32), spacing=(2.0, 1.0, 1.0))


def manifest(extra_preprocessing: str = "", **inference: object) -> PackageManifest:
    """The example manifest with a Python network (the callable is passed to run_package)."""
    text = manifest_text(
        weights='format = "python"\nfile = "w.pt"\nentry_point = "m:f"',
    )
    if extra_preprocessing:
        text = text.replace("[preprocessing]\n", f"[preprocessing]\n{extra_preprocessing}\n")
    for key, value in inference.items():
        line = f"{key} = {value}\n"
        text, found = re.subn(rf"^{key} = .*\n", line, text, flags=re.MULTILINE)
        if not found:
            text = text.replace("[inference]\n", f"[inference]\n{line}")
    return parse_manifest(text, "test")


def threshold_network(batch: torch.Tensor) -> torch.Tensor:
    """Three-class scores from intensity alone (after minmax of [-200, 300]): background
    below 0.5 (50 HU), label 1 above it, never label 2; exact under any patching."""
    high = (batch > 0.5).float()
    return torch.cat([1 - high, high, torch.zeros_like(high) - 1], dim=1) * 10


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_masks_come_back_on_the_source_grid() -> None:
    volume = ct_like()
    run = run_package(manifest(), threshold_network, volume, CPU)
    assert run.masks.shape == (2, *volume.hu.shape)
    assert run.masks.dtype == np.bool_
    truth = volume.hu > 50.0
    # Resampled to 1.5 mm and back: the ball's edge may move by a voxel, nothing more.
    assert dice(run.masks[0], truth) > 0.97
    assert not run.masks[1].any()
    assert run.precision == "float32"
    assert run.times.forward > 0 and run.times.total >= run.times.forward


def test_without_resampling_the_masks_are_exact() -> None:
    volume = ct_like()
    text = manifest_text(weights='format = "python"\nfile = "w.pt"\nentry_point = "m:f"')
    text = text.replace("spacing_mm = [1.5, 1.5, 1.5]\n", "")
    run = run_package(parse_manifest(text, "test"), threshold_network, volume, CPU)
    assert np.array_equal(run.masks[0], volume.hu > 50.0)


@pytest.mark.parametrize(
    ("orientation", "left_half"), [("LPS", False), ("RAS", True)], ids=["LPS", "RAS"]
)
def test_orientation_is_what_the_network_sees(orientation: str, left_half: bool) -> None:
    # The network marks the low-x half of what it is given. In LPS network x runs towards
    # the patient's left, so that is the patient's right, stored in the low columns; in RAS
    # it runs towards the right, so the marked half is the patient's left, the high columns.
    def low_x(batch: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(batch.shape[-1], device=batch.device)
        marked = (columns < batch.shape[-1] // 2).float().expand_as(batch)
        return torch.cat([1 - marked, marked, torch.zeros_like(marked) - 1], dim=1) * 10

    text = manifest_text(weights='format = "python"\nfile = "w.pt"\nentry_point = "m:f"')
    text = text.replace("spacing_mm = [1.5, 1.5, 1.5]\n", f'orientation = "{orientation}"\n')
    text = text.replace("patch_size = [16, 16, 16]", 'mode = "whole"')
    volume = ct_like((6, 8, 10))
    masks = run_package(parse_manifest(text, "test"), low_x, volume, CPU).masks[0]
    assert masks[..., 5:].all() == left_half
    assert masks[..., :5].all() != left_half


@pytest.mark.parametrize("kind", ["torchscript", "export", "python"])
def test_example_unet_packages_agree(packages: dict[str, Path], kind: str) -> None:
    volume = ct_like()
    reference = PackagedModel(load_package(packages["python"])).predict(volume, CPU)
    masks = PackagedModel(load_package(packages[kind])).predict(volume, CPU)
    assert masks.shape == (2, *volume.hu.shape)
    assert np.array_equal(masks, reference)


def test_network_is_moved_once(packages: dict[str, Path]) -> None:
    model = PackagedModel(load_package(packages["torchscript"]))
    assert model.network_on(CPU) is model.network_on(CPU)
    # Another device gets a copy, made once and kept; the CPU original stays where it was.
    # ("meta" stands in for a GPU: tensors with shapes and no storage.)
    package = load_package(packages["python"])
    model = PackagedModel(package)
    meta = torch.device("meta")
    moved = model.network_on(meta)
    assert moved is model.network_on(meta)
    assert moved is not package.network
    assert {p.device for p in moved.parameters()} == {meta}  # type: ignore[attr-defined]
    assert {p.device for p in package.network.parameters()} == {CPU}  # type: ignore[attr-defined]


def test_fallback_plans() -> None:
    assert fallback_plans(8, gpu=True) == [
        Plan(8),
        Plan(4),
        Plan(2),
        Plan(1),
        Plan(1, on_host=True),
    ]
    assert fallback_plans(1, gpu=True) == [Plan(1), Plan(1, on_host=True)]
    assert fallback_plans(8, gpu=False) == [Plan(8)]


def test_out_of_memory_retries_with_smaller_batches(caplog: pytest.LogCaptureFixture) -> None:
    sizes: list[int] = []

    def tight(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(int(batch.shape[0]))
        if batch.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return threshold_network(batch)

    volume = ct_like()
    info = manifest(batch_size=4)
    expected = run_package(info, threshold_network, volume, CPU).masks
    with caplog.at_level(logging.WARNING):
        run = run_package(info, tight, volume, CPU, plans=fallback_plans(4, gpu=True))
    assert np.array_equal(run.masks, expected)
    assert run.plan == Plan(1)
    assert sizes[:2] == [4, 2] and set(sizes[2:]) == {1}
    assert run.times.notes == [
        "out of GPU memory with batch 4; retrying with batch 2",
        "out of GPU memory with batch 2; retrying with batch 1",
    ]
    assert "retrying with batch 1" in caplog.text


def test_out_of_memory_at_every_plan_is_named() -> None:
    def hopeless(batch: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfGpuMemory) as caught:
        run_package(manifest(), hopeless, ct_like(), CPU, plans=fallback_plans(2, gpu=True))
    assert str(caught.value) == (
        "out of GPU memory on cpu even with batch 1, volume in host memory (patch 16x16x16)"
    )


def test_host_plan_keeps_the_volume_on_the_host() -> None:
    devices: list[torch.device] = []

    def recording(batch: torch.Tensor) -> torch.Tensor:
        devices.append(batch.device)
        return threshold_network(batch)

    volume = ct_like()
    run = run_package(manifest(), recording, volume, CPU, plans=[Plan(2, on_host=True)])
    assert run.plan.on_host and set(devices) == {CPU}
    expected = run_package(manifest(), threshold_network, volume, CPU).masks
    assert np.array_equal(run.masks, expected)


def test_mixed_precision_applies_on_cuda_only() -> None:
    run = run_package(manifest(precision='"bfloat16"'), threshold_network, ct_like(), CPU)
    assert run.precision == "float32"


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            lambda b: (_ for _ in ()).throw(ValueError("bad input\nmore")),
            "the model failed: bad input",
        ),
        (lambda b: torch.full((b.shape[0], 3, *b.shape[2:]), float("nan")), "NaN or infinite"),
        (lambda b: torch.zeros(b.shape[0], 2, *b.shape[2:]), "gives 2 output channels"),
        (lambda b: torch.zeros(b.shape[0], 3, 8, 8, 8), "returned shape"),
    ],
    ids=["raises", "nan", "too few channels", "wrong shape"],
)
def test_a_misbehaving_network_is_named(network: object, message: str) -> None:
    with pytest.raises(NetworkFailed, match=message):
        run_package(manifest(), network, ct_like(), CPU)  # type: ignore[arg-type]


def test_auto_falls_back_to_the_cpu_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=inference_runner.__name__):
        assert resolve_device("auto", "tiny-unet") == CPU
    assert "model tiny-unet: no CUDA device here; running on the CPU" in caplog.text
    assert resolve_device("cpu", "tiny-unet") == CPU


def test_a_named_gpu_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RetryableError, match="configured for CUDA, which is not available"):
        resolve_device("cuda", "tiny-unet")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RetryableError, match="cuda:3; this host has 1 CUDA devices"):
        resolve_device("cuda:3", "tiny-unet")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_cuda_agrees_with_the_cpu(packages: dict[str, Path], precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    volume = ct_like((40, 96, 96))
    package = load_package(packages["export"])
    cpu_run = run_package(package.manifest, package.network, volume, CPU)
    model = PackagedModel(package, precision)
    gpu_run = run_package(
        package.manifest, model.network_on(cuda), volume, cuda, precision=precision
    )
    assert gpu_run.precision == precision
    # Mixed precision may flip a voxel whose two best classes are nearly tied; no more.
    agreement = float((cpu_run.masks == gpu_run.masks).mean())
    assert agreement > (0.9999 if precision == "float32" else 0.995)


def test_channel_argmax_is_torchs_with_ties_to_the_first() -> None:
    from agent.models.runner import _argmax_channels

    scores = torch.randint(0, 4, (5, 6, 7, 8), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(_argmax_channels(scores).long(), scores.argmax(dim=0))


def test_bool_masks_on_a_resampled_grid_come_back() -> None:
    # A whole-volume network answering masks, not scores, at 1.5 mm: each label's mask is
    # resampled to the source grid and kept where at least half in.
    def masks_of(batch: torch.Tensor) -> torch.Tensor:
        inside = batch > 0.5
        return torch.cat([inside, torch.zeros_like(inside)], dim=1)

    text = manifest_text(weights='format = "python"\nfile = "w.pt"\nentry_point = "m:f"')
    text = text.replace("patch_size = [16, 16, 16]", 'mode = "whole"')
    text = text.replace("[inference]\n", '[inference]\nactivation = "sigmoid"\n')
    volume = ct_like()
    masks = run_package(parse_manifest(text, "test"), masks_of, volume, CPU).masks
    assert masks.shape == (2, *volume.hu.shape)
    assert dice(masks[0], volume.hu > 50.0) > 0.97
    assert not masks[1].any()
