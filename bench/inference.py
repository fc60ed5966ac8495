"""Inference benchmark: a 300-slice 512x512 CT through the example U-Net package, stage by stage.

    python -m bench.inference [--device auto|cpu|cuda] [--runs 2] [--slices 300]

What a GPU worker does with one study, timed per stage with the device synchronised at each
boundary: load (decode the DICOM files into a volume), preprocess (to the device, turned and
resampled to the package's spacing, intensity window), forward (the sliding window over the
network), postprocess (probabilities back to the source grid, masks to host memory), measure
(volumes and means per segment) and, in the IO worker, SEG + SR encode. Printed: the median of
each stage over the runs, the share of the worker's wall time (load to measure) that the
forward pass takes, and on CUDA each mixed precision against float32: forward speed-up and the
agreement of the masks.

The network is the tests' two-level 3D U-Net (`tests/models/unet.py`), exported with
torch.export with fixed random weights: its speed is that of a real network of its width,
its output means nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.filewriter import dcmwrite

from agent.dicom.uids import output_uids
from agent.domain import Measurement
from agent.encode.seg import build_seg
from agent.encode.sr import build_sr
from agent.inference.runner import measure, pick_device
from agent.inference.volume import Volume, load_volume
from agent.models.package import load_package
from agent.models.runner import PackagedModel, run_package
from bench.ct_series import write_ct_series
from tests.models.packages import manifest_text, save_exported
from tests.models.unet import UNet3d
from tests.support.volumes import stack_refs

STAGES = ("load", "preprocess", "forward", "postprocess", "measure", "encode")
WORKER = STAGES[:-1]  # the GPU worker's part; encoding runs in the IO worker


@dataclass
class Run:
    precision: str
    seconds: dict[str, float]
    masks: np.ndarray


def write_package(folder: Path, width: int, patch: int, batch: int, overlap: float) -> Path:
    torch.manual_seed(0)
    network = UNet3d(in_channels=1, classes=3, width=width).eval()
    folder.mkdir(parents=True)
    save_exported(network, folder / "model.pt2", (patch, patch, patch))
    text = manifest_text(weights='format = "export"\nfile = "model.pt2"')
    text = text.replace("patch_size = [16, 16, 16]", f"patch_size = [{patch}, {patch}, {patch}]")
    text = text.replace("overlap = 0.5", f"overlap = {overlap}")
    text = text.replace("batch_size = 3", f"batch_size = {batch}")
    (folder / "model.toml").write_text(text)
    return folder


def one_run(files: list[Path], model: PackagedModel, device: torch.device, precision: str) -> Run:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    refs = stack_refs(files)
    volume = load_volume(refs)
    seconds["load"] = time.perf_counter() - start
    network = model.network_on(device)
    run = run_package(model.package.manifest, network, volume, device, precision=precision)
    seconds.update(
        preprocess=run.times.preprocess,
        forward=run.times.forward,
        postprocess=run.times.postprocess,
    )
    start = time.perf_counter()
    measurements = tuple(
        measure(run.masks[i], volume, spec.number) for i, spec in enumerate(model.segments)
    )
    seconds["measure"] = time.perf_counter() - start
    seconds["encode"] = _encode(volume, run.masks, model, measurements)
    return Run(run.precision, seconds, run.masks)


def _encode(
    volume: Volume,
    masks: np.ndarray,
    model: PackagedModel,
    measurements: tuple[Measurement, ...],
) -> float:
    start = time.perf_counter()
    source = list(volume.sources)
    uids = output_uids(
        str(source[0].StudyInstanceUID), [str(ds.SOPInstanceUID) for ds in source], model.identity
    )
    seg = build_seg(
        source,
        masks,
        model.segments,
        model.identity,
        uids,
        frames=list(volume.source_frames),
        series_number=9001,
        instance_number=1,
        disclaimer=model.identity.intended_use,
    )
    sr = build_sr(
        source,
        seg,
        model.segments,
        measurements,
        model.identity,
        uids,
        series_number=9002,
        instance_number=1,
        disclaimer=model.identity.intended_use,
    )
    for ds in (seg, sr):
        dcmwrite(io.BytesIO(), ds, enforce_file_format=True)
    return time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--width", type=int, default=16, help="U-Net channels at full size")
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels (even)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = pick_device() if args.device == "auto" else torch.device(args.device)
    precisions = ["float32", "bfloat16", "float16"] if device.type == "cuda" else ["float32"]

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        files = write_ct_series(root / "ct", slices=args.slices)
        package = load_package(
            write_package(root / "model", args.width, args.patch, args.batch, args.overlap)
        )
        model = PackagedModel(package)
        params = sum(p.numel() for p in UNet3d(1, 3, args.width).parameters())
        print(
            f"{args.slices}x512x512 CT (0.75 x 0.75 x 1.0 mm), example U-Net width {args.width} "
            f"({params:,} parameters), patch {args.patch}^3, batch {args.batch}, overlap "
            f"{args.overlap}, resampled to 1.5 mm; {_device_name(device)}; torch "
            f"{torch.__version__}",
            flush=True,
        )
        one_run(files, model, device, precisions[0])  # warm-up: kernels, caches, page cache
        runs: dict[str, list[Run]] = {p: [] for p in precisions}
        for number in range(args.runs):
            for precision in precisions:
                run = one_run(files, model, device, precision)
                runs[precision].append(run)
                total = sum(run.seconds[s] for s in WORKER)
                print(f"  run {number + 1} {precision}: worker {total:.2f} s", flush=True)

    medians = {
        p: {s: statistics.median(r.seconds[s] for r in rs) for s in STAGES}
        for p, rs in runs.items()
    }
    print()
    print(f"{'stage (median s)':<22}" + "".join(f"{p:>12}" for p in precisions))
    for stage in STAGES:
        label = "SEG+SR encode (io)" if stage == "encode" else stage
        print(f"{label:<22}" + "".join(f"{medians[p][stage]:>12.2f}" for p in precisions))
    worker = {p: sum(medians[p][s] for s in WORKER) for p in precisions}
    print(f"{'worker wall time':<22}" + "".join(f"{worker[p]:>12.2f}" for p in precisions))
    share = {p: medians[p]["forward"] / worker[p] for p in precisions}
    print(f"{'forward share':<22}" + "".join(f"{share[p]:>11.0%} " for p in precisions))
    reference = runs["float32"][0].masks
    summary: dict[str, object] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "slices": args.slices,
        "width": args.width,
        "patch": args.patch,
        "batch": args.batch,
        "overlap": args.overlap,
        "medians": medians,
        "forward_share": share,
    }
    for precision in precisions[1:]:
        speedup = medians["float32"]["forward"] / medians[precision]["forward"]
        agree = float((runs[precision][0].masks == reference).mean())
        print(f"{precision} vs float32: forward {speedup:.2f}x faster, masks agree on {agree:.4%}")
        summary[f"{precision}_speedup"] = speedup
        summary[f"{precision}_agreement"] = agree
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
