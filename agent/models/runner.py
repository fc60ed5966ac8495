"""Run a model package on a volume: to the network's grid on the device, sliding window under
mixed precision, back to the source grid as masks; smaller batches, then host memory, on OOM."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.domain import ModelIdentity, SegmentSpec
from agent.errors import PermanentError
from agent.inference.volume import Volume
from agent.models.grid import reorientation, resample, resampled_shape, resampled_slabs
from agent.models.intensity import preprocess_intensity
from agent.models.manifest import PackageManifest
from agent.models.package import PACKAGE_CODE_ERRORS, ModelPackage, Network, first_line
from agent.models.window import sliding_window

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OutOfGpuMemory(PermanentError):
    """The network does not fit the GPU even one patch at a time with the volume on the host."""


class NetworkFailed(PermanentError):
    """The package's network raised, or answered out of shape or with NaN."""


@dataclass(frozen=True)
class Plan:
    """How one attempt runs: patches per batch, and where the volume and its blending live."""

    batch_size: int
    on_host: bool = False  # volume, blending and resampling in host memory; network on GPU

    def describe(self) -> str:
        where = ", volume in host memory" if self.on_host else ""
        return f"batch {self.batch_size}{where}"


def fallback_plans(batch_size: int, gpu: bool) -> list[Plan]:
    """The attempts out-of-memory walks through: the package's batch, halved down to 1, then
    the volume in host memory. On the CPU there is one (running out of host memory is not
    something a smaller batch reliably cures, and the kernel's OOM killer ends it anyway)."""
    if not gpu:
        return [Plan(batch_size)]
    plans = []
    size = batch_size
    while size > 1:
        plans.append(Plan(size))
        size //= 2
    return [*plans, Plan(1), Plan(1, on_host=True)]


@dataclass
class StageTimes:
    """Seconds per stage of one run, measured between device synchronisations."""

    preprocess: float = 0.0
    forward: float = 0.0
    postprocess: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.preprocess + self.forward + self.postprocess


@dataclass(frozen=True)
class PackageRun:
    masks: np.ndarray  # bool (outputs, z, y, x) on the source grid
    times: StageTimes
    plan: Plan
    precision: str  # what the network actually ran in


def run_package(
    manifest: PackageManifest,
    network: Network,
    volume: Volume,
    device: torch.device,
    *,
    precision: str | None = None,
    plans: list[Plan] | None = None,
) -> PackageRun:
    """The package's masks for `volume`; `network` must already be on `device`.

    `precision` overrides the manifest's (a benchmark compares float32 with mixed precision).
    Out of GPU memory, each plan of `plans` (default: `fallback_plans`) is tried in turn.
    """
    wanted = precision or manifest.inference.precision
    ran = wanted if device.type == "cuda" else "float32"
    if ran != wanted:
        log.debug("precision %s applies on CUDA; the CPU runs float32", wanted)
    times = StageTimes()
    # A whole-volume network has no batch to shrink: it runs once, or fails by name.
    gpu = device.type == "cuda" and manifest.inference.mode == "sliding_window"
    attempts = plans or fallback_plans(manifest.inference.batch_size, gpu)
    for number, plan in enumerate(attempts):
        try:
            with torch.inference_mode():
                masks = _attempt(manifest, network, volume, device, plan, PRECISIONS[ran], times)
            return PackageRun(masks, times, plan, ran)
        except torch.OutOfMemoryError:
            _release(device)
            if number + 1 == len(attempts):
                raise OutOfGpuMemory(_oom_reason(manifest, device, plan)) from None
            nxt = attempts[number + 1]
            note = f"out of GPU memory with {plan.describe()}; retrying with {nxt.describe()}"
            log.warning("%s", note)
            times.notes.append(note)
    raise AssertionError("fallback_plans is never empty")


def _attempt(
    manifest: PackageManifest,
    network: Network,
    volume: Volume,
    device: torch.device,
    plan: Plan,
    dtype: torch.dtype,
    times: StageTimes,
) -> np.ndarray:
    work = torch.device("cpu") if plan.on_host else device
    prep = manifest.preprocessing
    turn = reorientation(volume.axes, prep.orientation)
    with _stage(times, "preprocess", device):
        x = turn.apply(_to_device(volume.hu, work))[None]  # (1, z, y, x) on the network's axes
        spacing = turn.spacing(volume.spacing)
        oriented_shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
        if prep.spacing_mm is not None:
            x = resample(x, resampled_shape(oriented_shape, spacing, prep.spacing_mm))
            spacing = prep.spacing_mm
        x = preprocess_intensity(x, prep)
    with _stage(times, "forward", device), _autocast(device, dtype):
        scores = _forward(manifest, network, x, spacing, device, plan)
    with _stage(times, "postprocess", device):
        del x
        channels = manifest.output_channels
        if int(scores.shape[0]) < channels:
            raise NetworkFailed(
                f"the model gives {int(scores.shape[0])} output channels; outputs up to "
                f"index {manifest.outputs[-1].index} need {channels}"
            )
        masks = turn.undo(_masks(manifest, scores, oriented_shape))
        return _to_host(masks)


def _forward(
    manifest: PackageManifest,
    network: Network,
    x: torch.Tensor,
    spacing: tuple[float, float, float],
    device: torch.device,
    plan: Plan,
) -> torch.Tensor:
    """(K, z, y, x) scores (or bool masks) on x's device."""
    inference = manifest.inference
    try:
        if inference.mode == "whole":
            batch = x[None].to(device, non_blocking=True)
            scores = (
                network(batch, spacing)  # type: ignore[call-arg]
                if inference.spacing_argument
                else network(batch)
            )
            if scores.dim() != 5 or tuple(scores.shape[2:]) != tuple(x.shape[1:]):
                raise NetworkFailed(
                    f"the model returned shape {tuple(scores.shape)} for the volume "
                    f"{tuple(batch.shape)}; expected (1, K, same z, y, x)"
                )
            return scores[0].to(x.device)
        assert inference.patch_size is not None  # the manifest checks it
        return sliding_window(
            x,
            network,
            patch_size=inference.patch_size,
            overlap=inference.overlap,
            batch_size=plan.batch_size,
            device=device,
        )
    except torch.OutOfMemoryError:  # a RuntimeError, but the caller's to handle
        raise
    except PACKAGE_CODE_ERRORS as exc:
        raise NetworkFailed(f"the model failed: {first_line(exc)}") from None


def _masks(
    manifest: PackageManifest, scores: torch.Tensor, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Bool (outputs, z, y, x) on the oriented source grid `shape`."""
    indices = [o.index for o in manifest.outputs]
    argmax = False
    if scores.dtype == torch.bool and tuple(scores.shape[1:]) == shape:
        return scores[[i - 1 for i in indices]]  # masks on the source grid already (ct-tissue)
    if scores.dtype == torch.bool:
        # Masks from the network: a voxel of the source grid is in where it is at least half in.
        values, threshold = scores[[i - 1 for i in indices]], 0.5 - 1e-6
    elif not bool(torch.isfinite(scores).all()):
        raise NetworkFailed("the model gave NaN or infinite scores")
    elif manifest.inference.activation == "sigmoid":
        values, threshold = torch.sigmoid(scores[[i - 1 for i in indices]].float()), 0.5
    else:
        # Softmax: resample the probabilities, not the labels (as nnU-Net does), then take
        # the most likely class on the source grid.
        values, threshold, argmax = torch.softmax(scores.float(), dim=0), 0.0, True
    del scores
    masks = torch.empty((len(indices), *shape), dtype=torch.bool, device=values.device)
    for first, slab in resampled_slabs(values, shape):
        part = masks[:, first : first + slab.shape[1]]
        if argmax:
            labels = _argmax_channels(slab)
            for k, index in enumerate(indices):
                torch.eq(labels, index, out=part[k])
        else:
            torch.gt(slab, threshold, out=part)
    return masks


def _argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=0)` (the first channel wins a tie) as int16, one channel at a time:
    a reduction over the outermost dimension is strided and runs 25 times slower on the CPU."""
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.int16, device=scores.device)
    for channel in range(1, int(scores.shape[0])):
        better = scores[channel] > best
        labels.masked_fill_(better, channel)
        torch.maximum(best, scores[channel], out=best)
    return labels


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.require(array, dtype=np.float32, requirements=["C", "W"]))
    if device.type != "cuda":
        return host
    # Page-locked memory lets the copy run as DMA, without a staging copy by the driver.
    return host.pin_memory().to(device, non_blocking=True)


def _to_host(masks: torch.Tensor) -> np.ndarray:
    if masks.device.type != "cuda":
        return masks.contiguous().numpy()
    out = torch.empty(masks.shape, dtype=torch.bool, pin_memory=True)
    out.copy_(masks, non_blocking=True)
    torch.cuda.synchronize(masks.device)
    return out.numpy()


@contextlib.contextmanager
def _stage(times: StageTimes, name: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: time them to the end
        setattr(times, name, getattr(times, name) + time.perf_counter() - start)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    if device.type != "cuda" or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _release(device: torch.device) -> None:
    gc.collect()  # tensors of the failed attempt held by its frames
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_reason(manifest: PackageManifest, device: torch.device, plan: Plan) -> str:
    patch = manifest.inference.patch_size
    what = "x".join(str(n) for n in patch) if patch else "whole-volume"
    memory = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        memory = f", {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    return f"out of GPU memory on {device} even with {plan.describe()} (patch {what}{memory})"


class PackagedModel:
    """A model package as a registry Model; keeps its network on each device it has run on."""

    def __init__(self, package: ModelPackage, precision: str | None = None) -> None:
        self.package = package
        self.precision = precision
        self._networks: dict[torch.device, Network] = {}
        manifest = package.manifest
        self._identity = ModelIdentity(
            name=package.identity.name,
            version=package.identity.version,
            manufacturer=package.identity.manufacturer,
            device_uid=package.identity.device_uid,
            intended_use=manifest.model.intended_use,
        )
        self._segments = manifest.segments()

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def segments(self) -> tuple[SegmentSpec, ...]:
        return self._segments

    def network_on(self, device: torch.device) -> Network:
        """The network on `device`, moved there once and kept for every later study."""
        if device not in self._networks:
            network = self.package.network
            if isinstance(network, torch.nn.Module) and device.type != "cpu":
                # A copy: the CPU original stays usable for a CPU fallback or a second GPU.
                network = copy.deepcopy(network).to(device)
            self._networks[device] = network
        return self._networks[device]

    def predict(self, volume: Volume, device: torch.device) -> np.ndarray:
        network = self.network_on(device)
        run = run_package(self.package.manifest, network, volume, device, precision=self.precision)
        t = run.times
        log.info(
            "%s on %s (%s, %s): preprocess %.2f s, forward %.2f s, postprocess %.2f s",
            self._identity.name,
            device,
            run.precision,
            run.plan.describe(),
            t.preprocess,
            t.forward,
            t.postprocess,
        )
        return run.masks
