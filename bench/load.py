"""Load benchmark: the agent's decode_frames (every core) against a plain pydicom loop, per syntax.

A synthetic CT series (default 300 slices of 512x512, bench/ct_series.py) is encoded once into
each transfer syntax (cached in a temp folder) with the encoders of tests/support/encodings.py.
Each run times, on the same files: a plain loop (dcmread + pixel_array + rescale + np.stack into
float32) on one CPU, the same loop free to use every CPU, and `decode_frames` with its process pool
(started before the timed part, as a worker keeps it). A last, separate call measures the peak
memory of the agent's process tree. See bench/README.md.

    python -m bench.load [--slices 300] [--syntaxes j2k,jpeg-ls] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom

from agent.inference.decode import DecodeItem, decode_frames, decoder_for
from agent.inference.decode_pool import default_workers, shutdown_pool, warm_pool
from bench.ct_series import write_ct_series
from tests.support.encodings import (
    BY_LABEL,
    ENCODINGS,
    encode_series,
    encoder_missing,
    reduce_bits,
)

MIN_SPEEDUP = 1.8  # loop on one CPU / agent, for JPEG 2000 and JPEG-LS on 2 cores
MAX_MEMORY = 3.0  # peak of the agent's process tree, in volumes (float32 output array)
TARGET_LABELS = ("j2k", "j2k-lossy", "jpeg-ls", "jpeg-ls-near")
_COMPLETE = ".complete"


@dataclass
class Row:
    """The measurements of one transfer syntax."""

    label: str
    syntax: str
    lossless: bool
    agent_plugin: str
    size_mb: float = 0.0
    loop_1cpu_s: list[float] = field(default_factory=list)
    loop_all_s: list[float] = field(default_factory=list)
    agent_s: list[float] = field(default_factory=list)
    headers_s: float = 0.0  # reading the rescale of every file, outside the agent's timing
    peak_volumes: float | None = None
    max_diff_hu: float | None = None  # agent against the loop, same files
    skipped: str = ""

    @staticmethod
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def speedup(self, loop: list[float]) -> float | None:
        top, bottom = self.median(loop), self.median(self.agent_s)
        return None if top is None or not bottom else top / bottom

    @property
    def matches(self) -> bool:
        """Lossless syntaxes must decode bit-identically to the loop."""
        return self.max_diff_hu is not None and (not self.lossless or self.max_diff_hu == 0.0)


# -- data ---------------------------------------------------------------------------------------


def cached(folder: Path, make: Callable[[Path], list[Path]]) -> list[Path]:
    """The .dcm files of `folder`, made by `make` unless a complete earlier run left them."""
    if (folder / _COMPLETE).exists():
        return sorted(folder.glob("*.dcm"))
    with contextlib.suppress(FileNotFoundError):
        for stale in folder.glob("*.dcm"):
            stale.unlink()
    files = make(folder)
    (folder / _COMPLETE).touch()
    return sorted(files)


def encoded(root: Path, source: list[Path], label: str) -> list[Path]:
    """The series in the encoding `label`, from an unsigned or fewer-bit copy where it needs one."""
    encoding = BY_LABEL[label]
    # The series is signed; reduce_bits makes it unsigned (16 bits: the same HU).
    bits = encoding.bits or (16 if encoding.unsigned_only else None)
    if bits is not None:
        source = cached(root / f"native-{bits}bit", lambda d: reduce_bits(source, bits, d))
    return cached(root / label, lambda d: encode_series(source, encoding.syntax, d))


# -- the two loaders ------------------------------------------------------------------------------


def plain_loop(files: Sequence[Path]) -> np.ndarray:
    """What a script would write: read, decode (pydicom's default plugin), rescale, stack."""
    slices = []
    for path in files:
        ds = pydicom.dcmread(path)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append((ds.pixel_array.astype(np.float64) * slope + intercept).astype(np.float32))
    return np.stack(slices)


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Run this thread, and the threads it starts (a codec's own), on a single CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def items_of(files: Sequence[Path]) -> list[DecodeItem]:
    """DecodeItems from the headers; the agent has these from series selection already."""
    items = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        items.append(DecodeItem(path, 0, slope, intercept))
    return items


# -- memory ---------------------------------------------------------------------------------------


def _private_pss(pid: int) -> int:
    """Proportional set size of a process less its shared-memory pages, bytes."""
    pss = shmem = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss = int(rest.split()[0]) * 1024
            elif key == "Pss_Shmem":
                shmem = int(rest.split()[0]) * 1024
    return pss - shmem


def _shmem() -> int:
    """Shared-memory pages of the whole machine (/proc/meminfo Shmem), bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def footprint() -> int:
    """Memory of this process and its children (the decoding pool), bytes.

    Private memory is each process's PSS less its shared-memory pages; shared memory is counted
    once, machine-wide: a page of the output block counts whether it is mapped by the parent, by
    a worker, by both or (between chunks) by none, and whether or not its name is unlinked yet.
    """
    me = psutil.Process()
    pids = [me.pid, *(child.pid for child in me.children(recursive=True))]
    return sum(_private_pss(pid) for pid in pids) + _shmem()


def peak_extra_bytes(call: Callable[[], object], interval_s: float) -> int:
    """Largest footprint() above its value just before `call`, sampled every `interval_s`."""
    baseline = footprint()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, footprint())
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        stop.set()
        sampler.join()
    return max(peak, footprint()) - baseline


# -- the benchmark --------------------------------------------------------------------------------


def measure(row: Row, files: list[Path], args: argparse.Namespace, volume_bytes: int) -> None:
    started = time.monotonic()
    items = items_of(files)
    row.headers_s = time.monotonic() - started
    loop_hu = agent_hu = np.empty(0)
    for run in range(1, args.runs + 1):
        # Alternate the order so that neither loader always follows the other.
        order = ("loop", "loop-all", "agent") if run % 2 else ("agent", "loop-all", "loop")
        for which in order:
            started = time.monotonic()
            if which == "agent":
                agent_hu = decode_frames(items, workers=args.workers)
                row.agent_s.append(time.monotonic() - started)
            elif which == "loop":
                with one_cpu():
                    loop_hu = plain_loop(files)
                row.loop_1cpu_s.append(time.monotonic() - started)
            else:
                plain_loop(files)
                row.loop_all_s.append(time.monotonic() - started)
        log(
            f"{row.label} run {run}: loop {row.loop_1cpu_s[-1]:.2f} s (1 CPU), "
            f"{row.loop_all_s[-1]:.2f} s (all), agent {row.agent_s[-1]:.2f} s"
        )
    row.max_diff_hu = float(np.abs(agent_hu.astype(np.float64) - loop_hu).max())
    del agent_hu, loop_hu
    extra = peak_extra_bytes(
        lambda: decode_frames(items, workers=args.workers), args.sample_ms / 1000
    )
    row.peak_volumes = extra / volume_bytes


def run_benchmark(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    root = args.cache / f"{args.slices}x{args.rows}x{args.cols}"
    log(f"series and encodings in {root}")
    source = cached(
        root / "native", lambda d: write_ct_series(d, args.slices, args.rows, args.cols)
    )
    volume_bytes = args.slices * args.rows * args.cols * 4
    workers = args.workers or default_workers()
    info = {
        "slices": args.slices,
        "rows": args.rows,
        "cols": args.cols,
        "runs": args.runs,
        "workers": workers,
        "cpus": default_workers(),
        "volume_mb": volume_bytes / 1e6,
        "load_average": load_average(),
        "python": platform.python_version(),
    }
    started = time.monotonic()
    warm_pool(workers)  # outside the timed part: a worker process keeps its pool
    log(f"decoding pool of {workers} processes started in {time.monotonic() - started:.2f} s")
    rows: list[Row] = []
    try:
        for label in args.syntaxes:
            encoding = BY_LABEL[label]
            row = Row(
                label, encoding.syntax.name, encoding.lossless, decoder_for(encoding.syntax) or "-"
            )
            rows.append(row)
            if (missing := encoder_missing(encoding.syntax)) is not None:
                row.skipped = missing
                log(f"{label}: skipped, {missing}")
                continue
            started = time.monotonic()
            try:
                files = encoded(root, source, label)
            except RuntimeError as exc:  # an encoder failed: report it, measure the rest
                row.skipped = str(exc).splitlines()[0][:200]
                log(f"{label}: skipped, {row.skipped}")
                continue
            row.size_mb = sum(f.stat().st_size for f in files) / 1e6
            log(
                f"{label}: {len(files)} files, {row.size_mb:.0f} MB "
                f"({time.monotonic() - started:.1f} s)"
            )
            measure(row, files, args, volume_bytes)
    finally:
        shutdown_pool()
    return rows, info


# -- output -----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdicts(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    measured = [r for r in rows if not r.skipped]
    checks = []
    for row in measured:
        if row.label in TARGET_LABELS:
            speedup = row.speedup(row.loop_1cpu_s)
            checks.append(
                (
                    f"{row.label}: speedup {fmt(speedup, '.2f')} >= {MIN_SPEEDUP}",
                    speedup is not None and speedup >= MIN_SPEEDUP,
                )
            )
    worst = max((r.peak_volumes or 0.0 for r in measured), default=0.0)
    checks.append(
        (f"peak memory {worst:.2f} x volume < {MAX_MEMORY:g} (worst syntax)", worst < MAX_MEMORY)
    )
    mismatched = [r.label for r in measured if not r.matches]
    checks.append(
        (
            "lossless syntaxes identical to the loop"
            + (f" (differ: {', '.join(mismatched)})" if mismatched else ""),
            not mismatched,
        )
    )
    return checks


def render(rows: Sequence[Row], info: dict[str, Any]) -> str:
    lines = [
        f"pacs-agent load benchmark: {info['slices']} slices {info['rows']}x{info['cols']} CT "
        f"(signed 16-bit), float32 volume {info['volume_mb']:.0f} MB, {info['runs']} runs, "
        f"{info['cpus']} CPUs, {info['workers']} decoding processes, Python {info['python']}",
        "load average before the runs: "
        + (" ".join(f"{v:.2f}" for v in info["load_average"]) or "n/a"),
        "",
        "seconds, median of the runs; speedup = loop on 1 CPU / agent (and loop on all CPUs /"
        " agent); peak = agent's process tree above its idle level, in float32 volumes",
    ]
    header = (
        f"{'syntax':<18}{'plugin':<11}{'MB':>6}{'loop 1cpu':>11}{'loop all':>10}{'agent':>8}"
        f"{'speedup':>9}{'(all)':>7}{'peak':>7}  agent = loop"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.label:<18}skipped: {r.skipped}")
            continue
        same = "yes" if r.max_diff_hu == 0 else f"max diff {fmt(r.max_diff_hu, '.1f')} HU"
        lines.append(
            f"{r.label:<18}{r.agent_plugin:<11}{r.size_mb:>6.0f}"
            f"{fmt(r.median(r.loop_1cpu_s), '.2f'):>11}{fmt(r.median(r.loop_all_s), '.2f'):>10}"
            f"{fmt(r.median(r.agent_s), '.2f'):>8}{fmt(r.speedup(r.loop_1cpu_s), '.2f'):>9}"
            f"{fmt(r.speedup(r.loop_all_s), '.2f'):>7}{fmt(r.peak_volumes, '.2f'):>7}  {same}"
        )
    headers = [r.headers_s for r in rows if not r.skipped]
    if headers:
        lines.append(
            f"(reading the {info['slices']} headers for the rescale, outside the agent's time: "
            f"median {statistics.median(headers):.2f} s)"
        )
    lines += ["", "targets:"]
    checks = verdicts(rows)
    lines += [f"  {'PASS' if ok else 'MISS'}  {text}" for text, ok in checks]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--syntaxes",
        default=",".join(e.label for e in ENCODINGS),
        help="comma-separated labels (default: all): " + ", ".join(e.label for e in ENCODINGS),
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: all CPUs)"
    )
    parser.add_argument("--sample-ms", type=float, default=5.0, help="memory sampling interval")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacs-agent-bench-load",
        help="where the encoded series are kept between runs",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    args.syntaxes = [s.strip() for s in args.syntaxes.split(",") if s.strip()]
    unknown = [s for s in args.syntaxes if s not in BY_LABEL]
    if unknown:
        parser.error(f"unknown syntax label(s): {', '.join(unknown)}")
    if args.runs < 1 or args.slices < 16:
        parser.error("--runs must be at least 1 and --slices at least 16 (the parallel path)")
    rows, info = run_benchmark(args)
    print(render(rows, info), flush=True)
    if args.json is not None:
        data = {"info": info, "rows": [asdict(r) for r in rows], "targets": verdicts(rows)}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if all(ok for _, ok in verdicts(rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
