"""Ingest benchmark: DCMTK storescu -> storescp, Orthanc and `pacs-agent serve`, plus end to end.

Every run sends one synthetic CT series (default 300 slices of 512x512, uncompressed) with DCMTK
storescu over one association to each target, timed with a monotonic clock around the storescu
call, each time with fresh study/series/instance UIDs. The agent's STOW-RS front door gets the
same series as one multipart/related request (streamed from the files by `requests`), timed
from the request's start to its 200. After the pacs-agent send, the benchmark
also waits until the agent's SEG + SR are stored in Orthanc (the agent's destination) and reads
the stage timestamps from the agent's database. See bench/README.md.

    TCP_NODELAY=1 python -m bench.ingest [--slices 300] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from pydicom.uid import generate_uid
from sqlalchemy import select

from agent.db.database import Database
from agent.db.schema import Transition
from agent.db.states import State
from agent.spool.layout import SpoolLayout
from bench.ct_series import write_ct_series
from tests.support.agent import AgentProcess, agent_database, write_config
from tests.support.dcmtk import StoreSCP, dcmtk_tool, storescu
from tests.support.orthanc import Orthanc
from tests.support.ports import LOOPBACK, free_port, wait_until_listening
from tests.support.process import ManagedProcess

# "pynetdicom" is a reference, not a peer: pynetdicom acknowledging without storing anything.
# "agent-stow" is pacs-agent's STOW-RS door on its web port, the same series in one request.
TARGETS = ("storescp", "orthanc", "pacs-agent", "agent-stow", "pynetdicom")
AGENT_AET = "PACS_AGENT"
CALLING_AET = "BENCH_SCU"
STORESCU_TIMEOUT_S = 300.0
END_TO_END_TIMEOUT_S = 300.0
POLL_S = 0.1
# Ratio targets of the receive time (medians).
MAX_AGENT_OVER_STORESCP = 2.0
MAX_AGENT_OVER_ORTHANC = 1.0
MAX_STOW_OVER_ORTHANC = 1.0  # STOW-RS into the agent at least as fast as Orthanc's C-STORE
STOW_TOKEN = "bench-stow-token"
STOW_CHUNK_BYTES = 1024 * 1024

# (label, from state, to state) of the per-stage breakdown; None means the study's last arrival.
STAGES: tuple[tuple[str, State | None, State], ...] = (
    ("quiet wait (last arrival -> complete)", None, State.COMPLETE),
    ("selection + manifest (complete -> queued)", State.COMPLETE, State.QUEUED),
    ("queue pickup (queued -> inferring)", State.QUEUED, State.INFERRING),
    ("load + inference (inferring -> exporting)", State.INFERRING, State.EXPORTING),
    ("encode + export (exporting -> done)", State.EXPORTING, State.DONE),
)


@dataclass(frozen=True)
class Series:
    """One generated series, sent to exactly one target once."""

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    size_bytes: int


@dataclass
class Sample:
    """One timed send to one target."""

    target: str
    run: int
    seconds: float
    expected: int
    received: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.received == self.expected


@dataclass
class EndToEnd:
    """pacs-agent from the last acknowledged instance to SEG + SR stored in Orthanc."""

    run: int
    ok: bool
    to_orthanc_s: float | None = None  # storescu returned -> SEG + SR visible in Orthanc
    minus_quiet_s: float | None = None
    stages_s: dict[str, float] = field(default_factory=dict)
    state: str = ""
    reason: str = ""
    error: str = ""


@dataclass
class Report:
    slices: int
    rows: int
    cols: int
    runs: int
    quiet_seconds: float
    series_mb: float
    orthanc_sync_storage: bool
    cpus: int
    storescu: str
    load_average: list[float] = field(default_factory=list)  # 1, 5, 15 min, before the runs
    samples: list[Sample] = field(default_factory=list)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    agent_rss_mib: dict[str, float] = field(default_factory=dict)

    def seconds(self, target: str) -> list[float]:
        return [s.seconds for s in self.samples if s.target == target and s.ok]

    def median(self, target: str) -> float | None:
        values = self.seconds(target)
        return statistics.median(values) if values else None

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.median(numerator), self.median(denominator)
        return None if top is None or not bottom else top / bottom

    @property
    def all_received(self) -> bool:
        wanted = {(t, r) for t in TARGETS for r in range(1, self.runs + 1)}
        done = {(s.target, s.run) for s in self.samples if s.ok}
        return wanted <= done

    @property
    def end_to_end_ok(self) -> bool:
        return bool(self.end_to_end) and all(e.ok for e in self.end_to_end)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["medians_s"] = {t: self.median(t) for t in TARGETS}
        data["mb_per_s"] = {
            t: (self.series_mb / m if m else None) for t in TARGETS for m in [self.median(t)]
        }
        data["ratios"] = {
            "pacs-agent/storescp": self.ratio("pacs-agent", "storescp"),
            "pacs-agent/orthanc": self.ratio("pacs-agent", "orthanc"),
            "agent-stow/orthanc": self.ratio("agent-stow", "orthanc"),
        }
        data["all_received"] = self.all_received
        data["end_to_end_ok"] = self.end_to_end_ok
        for sample in data["samples"]:
            sample["ok"] = sample["error"] == "" and sample["received"] == sample["expected"]
        return data


# -- data ---------------------------------------------------------------------------------------


def generate(root: Path, name: str, slices: int, rows: int, cols: int) -> Series:
    """A series with its own study and series UIDs (instance UIDs are always new)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = root / name
    files = write_ct_series(folder, slices, rows, cols, study_uid=study_uid, series_uid=series_uid)
    return Series(folder, files, study_uid, series_uid, sum(f.stat().st_size for f in files))


def storescu_version() -> str:
    result = subprocess.run(
        [str(dcmtk_tool("storescu")), "--version"], capture_output=True, text=True, check=False
    )
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "storescu"
    return first.replace("$dcmtk:", "").replace("$", "").strip()


# -- one timed send -------------------------------------------------------------------------------


def timed_send(series: Series, port: int, called_aet: str) -> tuple[float, str]:
    """Send with storescu; return (seconds, error). Dirty pages are flushed first (fairness)."""
    os.sync()  # no target pays for another's (or the generator's) write-back
    start = time.monotonic()
    try:
        result = storescu(
            series.files,
            port=port,
            called_aet=called_aet,
            calling_aet=CALLING_AET,
            timeout=STORESCU_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return time.monotonic() - start, f"storescu still running after {STORESCU_TIMEOUT_S:g} s"
    elapsed = time.monotonic() - start
    error = ""
    if result.returncode != 0:
        error = f"storescu exited {result.returncode}: {(result.stderr or result.stdout)[-500:]}"
    return elapsed, error


def timed_stow(series: Series, url: str) -> tuple[float, str]:
    """POST the series as one STOW-RS request, streamed from the files; (seconds, error)."""
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path in series.files:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with path.open("rb") as fp:
                while chunk := fp.read(STOW_CHUNK_BYTES):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Authorization": f"Bearer {STOW_TOKEN}",
    }
    os.sync()
    start = time.monotonic()
    with requests.Session() as session:
        session.trust_env = False  # never a proxy: loopback only
        try:
            response = session.post(
                f"{url}/dicom-web/studies", data=body(), headers=headers, timeout=STORESCU_TIMEOUT_S
            )
        except requests.RequestException as exc:
            return time.monotonic() - start, f"STOW-RS failed: {exc}"
    elapsed = time.monotonic() - start
    error = "" if response.status_code == 200 else f"HTTP {response.status_code}"
    return elapsed, error


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def rss_mib(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS of a process, in MiB, from /proc (empty if unavailable)."""
    values: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024  # kB
    return values


# -- end to end -----------------------------------------------------------------------------------


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; the agent stores UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def transitions(db: Database, study_uid: str) -> tuple[datetime | None, dict[State, datetime]]:
    """The study's last arrival and the first time it entered each state (UTC)."""
    study = db.get(study_uid)
    if study is None:
        return None, {}
    with db.session() as s:
        rows = s.execute(
            select(Transition.state, Transition.at)
            .where(Transition.study_id == study.id)
            .order_by(Transition.id)
        ).all()
    first: dict[State, datetime] = {}
    for state, at in rows:
        first.setdefault(State(state), utc(at))
    return utc(study.last_arrival), first


def stage_breakdown(db: Database, study_uid: str) -> dict[str, float]:
    last_arrival, first = transitions(db, study_uid)
    stages: dict[str, float] = {}
    for label, start_state, end_state in STAGES:
        start = last_arrival if start_state is None else first.get(start_state)
        end = first.get(end_state)
        if start is not None and end is not None:
            stages[label] = (end - start).total_seconds()
    return stages


def outputs_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Modalities of the series Orthanc holds for the study (the agent's SEG and SR)."""
    study_id = orthanc.find_study(study_uid)
    if study_id is None:
        return []
    series = orthanc.get_json(f"/studies/{study_id}/series")
    return sorted(str(s.get("MainDicomTags", {}).get("Modality", "")) for s in series)


def wait_end_to_end(
    run: int,
    series: Series,
    sent: float,
    orthanc: Orthanc,
    db: Database,
    quiet_seconds: float,
    agent_alive: Callable[[], bool],
) -> EndToEnd:
    """Poll Orthanc (the truth) for SEG + SR and the database for a failed or skipped study."""
    deadline = sent + END_TO_END_TIMEOUT_S
    next_db_check = 0.0
    result = EndToEnd(run=run, ok=False)
    while True:
        now = time.monotonic()
        if len(outputs_in_orthanc(orthanc, series.study_uid)) >= 2:
            arrived = time.monotonic()
            result.to_orthanc_s = arrived - sent
            result.minus_quiet_s = result.to_orthanc_s - quiet_seconds
            break
        if now >= next_db_check:
            next_db_check = now + 0.5
            study = db.get(series.study_uid)
            if study is not None and study.state in (State.FAILED, State.SKIPPED):
                result.error = f"study {study.state}: {study.reason}"
                break
            if not agent_alive():
                result.error = "pacs-agent serve exited"
                break
        if now > deadline:
            result.error = f"no SEG + SR in Orthanc after {END_TO_END_TIMEOUT_S:g} s"
            break
        time.sleep(POLL_S)
    # The DONE transition is committed just after the export returns: give it a moment.
    done_by = time.monotonic() + 10
    while not result.error and time.monotonic() < done_by:
        study = db.get(series.study_uid)
        if study is not None and study.state == State.DONE:
            break
        time.sleep(POLL_S)
    study = db.get(series.study_uid)
    if study is not None:
        result.state, result.reason = str(study.state), study.reason
    result.stages_s = stage_breakdown(db, series.study_uid)
    modalities = outputs_in_orthanc(orthanc, series.study_uid)
    if not result.error and modalities != ["SEG", "SR"]:
        result.error = f"Orthanc holds {modalities} for the study, expected SEG and SR"
    result.ok = not result.error and result.state == State.DONE
    if not result.error and not result.ok:
        result.error = f"study is {result.state}, not done"
    return result


# -- the benchmark ----------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(keep: bool, prefix: str = "bench-ingest-") -> Iterator[Path]:
    """A fresh temporary folder, removed afterwards unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"(kept {root})", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


class BareSCP(ManagedProcess):
    """`bench/bare_scp.py`: pynetdicom acknowledging without storing, as a reference floor."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path)
        self.port = free_port()

    def start(self) -> None:
        process = self.spawn([sys.executable, "-m", "bench.bare_scp", str(self.port)])
        wait_until_listening(self.port, timeout=60, pid=process.pid)


def run_benchmark(args: argparse.Namespace) -> Report:
    with workdir(args.keep) as root, contextlib.ExitStack() as stack:
        log(f"generating {args.runs * len(TARGETS)} series of {args.slices} slices in {root}")
        plan: list[list[tuple[str, Series]]] = []
        for run in range(1, args.runs + 1):
            order = TARGETS[run - 1 :] + TARGETS[: run - 1]  # rotate: no target always first
            plan.append(
                [
                    (t, generate(root / "source", f"{t}-{run}", args.slices, args.rows, args.cols))
                    for t in order
                ]
            )
        series_bytes = plan[0][0][1].size_bytes
        report = Report(
            slices=args.slices,
            rows=args.rows,
            cols=args.cols,
            runs=args.runs,
            quiet_seconds=args.quiet,
            series_mb=series_bytes / 1e6,
            orthanc_sync_storage=args.orthanc_sync,
            cpus=os.cpu_count() or 0,
            storescu=storescu_version(),
            load_average=load_average(),
        )

        log("starting storescp, Orthanc and pacs-agent serve")
        scp = stack.enter_context(StoreSCP(root / "storescp"))
        orthanc = stack.enter_context(Orthanc(extra_config={"SyncStorageArea": args.orthanc_sync}))
        agent_port, web_port = free_port(), free_port()
        token_file = root / "stow-token"
        token_file.write_text(STOW_TOKEN)
        web = (
            f'[web]\nhost = "{LOOPBACK}"\nport = {web_port}\n'
            f'tokens = [{{ file = "{token_file}" }}]\n'
        )
        config = write_config(
            root / "agent",
            port=agent_port,
            quiet_seconds=args.quiet,
            destinations=[(orthanc.aet, LOOPBACK, orthanc.dicom_port)],
            extra=web,
        )
        bare_port = stack.enter_context(BareSCP(root / "bare-scp.log")).port
        agent = stack.enter_context(AgentProcess(config, "serve"))
        agent.wait_listening(agent_port)
        assert agent.process is not None
        agent_pid = agent.process.pid
        wait_until_listening(web_port, timeout=60, pid=agent_pid)
        db = stack.enter_context(agent_database(config))
        layout = SpoolLayout(root / "agent" / "spool")

        def agent_alive() -> bool:
            return agent.process is not None and agent.process.poll() is None

        for run, sends in enumerate(plan, start=1):
            for target, series in sends:
                if target == "storescp":
                    seconds, error = timed_send(series, scp.port, scp.aet)
                    received = len(scp.files())
                    for path in scp.files():  # keep the folder to this run's files only
                        path.unlink()
                elif target == "pynetdicom":
                    seconds, error = timed_send(series, bare_port, AGENT_AET)
                    # It keeps nothing: storescu's success for every instance is the count.
                    received = 0 if error else len(series.files)
                elif target == "agent-stow":
                    seconds, error = timed_stow(series, f"http://{LOOPBACK}:{web_port}")
                    sent = time.monotonic()
                    # A 200 means every instance is durable in the spool.
                    received = count_files(layout.study_dir(series.study_uid))
                elif target == "orthanc":
                    seconds, error = timed_send(series, orthanc.dicom_port, orthanc.aet)
                    received = len(orthanc.instances_of_series(series.series_uid))
                else:
                    seconds, error = timed_send(series, agent_port, AGENT_AET)
                    sent = time.monotonic()
                    # Acknowledged means durable in the spool, so the files are all there now.
                    received = count_files(layout.study_dir(series.study_uid))
                    if run == 1:
                        report.agent_rss_mib["peak_after_first_receive"] = rss_mib(agent_pid).get(
                            "VmHWM", 0.0
                        )
                sample = Sample(target, run, seconds, len(series.files), received, error)
                report.samples.append(sample)
                log(
                    f"run {run} {target:<10} {seconds:7.2f} s  "
                    f"{received}/{len(series.files)} received {error}"
                )
                if target == "agent-stow" and sample.ok:
                    # Not timed: only so that its processing does not overlap the next send.
                    e2e = wait_end_to_end(run, series, sent, orthanc, db, args.quiet, agent_alive)
                    log(f"run {run} STOW-RS study end to end {fmt_s(e2e.to_orthanc_s)} {e2e.error}")
                if target == "pacs-agent" and sample.ok:
                    e2e = wait_end_to_end(run, series, sent, orthanc, db, args.quiet, agent_alive)
                    report.end_to_end.append(e2e)
                    log(
                        f"run {run} end to end {fmt_s(e2e.to_orthanc_s)} "
                        f"(minus quiet {fmt_s(e2e.minus_quiet_s)}) {e2e.error}"
                    )
                    if not e2e.ok:
                        log(agent.log_tail(30))
                shutil.rmtree(series.folder, ignore_errors=True)
        memory = rss_mib(agent_pid)
        report.agent_rss_mib["peak_at_end"] = memory.get("VmHWM", 0.0)
        report.agent_rss_mib["rss_at_end"] = memory.get("VmRSS", 0.0)
        if agent.stop() != 0:
            log(f"pacs-agent serve exited non-zero:\n{agent.log_tail(30)}")
        return report


# -- output -----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def verdict(value: float | None, limit: float, inclusive: bool) -> str:
    if value is None:
        return "n/a"
    passed = value <= limit if inclusive else value < limit
    return "PASS" if passed else "MISS"


def render(report: Report) -> str:
    runs = range(1, report.runs + 1)
    lines = [
        f"pacs-agent ingest benchmark: {report.slices} slices {report.rows}x{report.cols} CT, "
        f"{report.series_mb:.1f} MB per series, {report.runs} runs, {report.cpus} CPUs, "
        f"Python {platform.python_version()}",
        f"sender: {report.storescu}, one association, Explicit VR Little Endian, TCP_NODELAY=1",
        "load average before the runs: "
        + (" ".join(f"{v:.2f}" for v in report.load_average) or "n/a")
        + " (anything else running on the machine skews every number below)",
        "",
        "receive time, seconds (storescu start -> last C-STORE acknowledged; fresh UIDs each send)",
    ]
    header = f"{'target':<12}" + "".join(f"{'run ' + str(r):>9}" for r in runs)
    header += f"{'median':>9}{'MB/s':>8}{'inst/s':>8}  received"
    lines += [header, "-" * len(header)]
    for target in TARGETS:
        samples = {s.run: s for s in report.samples if s.target == target}
        row = f"{target:<12}"
        for r in runs:
            s = samples.get(r)
            row += f"{'-' if s is None else f'{s.seconds:.2f}' + ('' if s.ok else '!'):>9}"
        median = report.median(target)
        mbps = f"{report.series_mb / median:.1f}" if median else "-"
        ips = f"{report.slices / median:.0f}" if median else "-"
        counts = [f"{samples[r].received}/{samples[r].expected}" for r in runs if r in samples]
        same = len(set(counts)) == 1 and len(counts) > 1
        got = counts[0] + " each run" if same else ", ".join(counts)
        row += f"{'-' if median is None else f'{median:.2f}':>9}{mbps:>8}{ips:>8}  {got}"
        lines.append(row)
    for s in report.samples:
        if not s.ok:
            why = s.error or f"{s.received}/{s.expected} instances received"
            lines.append(f"! {s.target} run {s.run} failed (left out of the median): {why}")
    agent_scp = report.ratio("pacs-agent", "storescp")
    agent_orthanc = report.ratio("pacs-agent", "orthanc")
    stow_orthanc = report.ratio("agent-stow", "orthanc")
    lines += [
        "",
        "ratios of medians:",
        f"  pacs-agent / storescp = {fmt_ratio(agent_scp)}  "
        f"(target <= {MAX_AGENT_OVER_STORESCP:.1f}: "
        f"{verdict(agent_scp, MAX_AGENT_OVER_STORESCP, True)})",
        f"  pacs-agent / Orthanc  = {fmt_ratio(agent_orthanc)}  "
        f"(target <  {MAX_AGENT_OVER_ORTHANC:.1f}: "
        f"{verdict(agent_orthanc, MAX_AGENT_OVER_ORTHANC, False)})",
        f"  agent-stow / Orthanc  = {fmt_ratio(stow_orthanc)}  "
        f"(target <= {MAX_STOW_OVER_ORTHANC:.1f}: "
        f"{verdict(stow_orthanc, MAX_STOW_OVER_ORTHANC, True)}; STOW-RS in, vs Orthanc's C-STORE)",
        f"  pynetdicom / storescp = {fmt_ratio(report.ratio('pynetdicom', 'storescp'))}  "
        "(reference: pynetdicom acknowledging without storing, the floor under pacs-agent)",
        "  durability: pacs-agent fdatasyncs each file and fsyncs its folder before acknowledging;",
        "  storescp does not fsync; Orthanc "
        + (
            "fsyncs each stored file (SyncStorageArea=true, its default)."
            if report.orthanc_sync_storage
            else "does not fsync (SyncStorageArea=false)."
        ),
    ]
    if report.end_to_end:
        lines += [
            "",
            "pacs-agent end to end, seconds (last instance acknowledged -> SEG + SR in Orthanc)",
        ]
        width = 44
        header = f"{'':<{width}}" + "".join(f"{'run ' + str(e.run):>9}" for e in report.end_to_end)
        header += f"{'median':>9}"
        lines += [header, "-" * len(header)]

        def e2e_row(label: str, values: Sequence[float | None]) -> str:
            present = [v for v in values if v is not None]
            cells = "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in values)
            median = f"{statistics.median(present):.2f}" if present else "-"
            return f"{label:<{width}}{cells}{median:>9}"

        e2e = report.end_to_end
        quiet_label = f"minus the quiet period ({report.quiet_seconds:g} s)"
        lines.append(e2e_row("total", [e.to_orthanc_s for e in e2e]))
        lines.append(e2e_row(quiet_label, [e.minus_quiet_s for e in e2e]))
        lines.append("stages, from the agent's database:")
        for label, _start, _end in STAGES:
            lines.append(e2e_row("  " + label, [e.stages_s.get(label) for e in e2e]))
        for e in e2e:
            if not e.ok:
                lines.append(f"run {e.run} FAILED: {e.error}")
    if report.agent_rss_mib:
        rss = report.agent_rss_mib
        lines += [
            "",
            "pacs-agent serve memory: peak RSS (VmHWM) "
            f"{rss.get('peak_after_first_receive', 0):.0f} MiB after the first receive, "
            f"{rss.get('peak_at_end', 0):.0f} MiB at the end (with inference); "
            f"RSS at the end {rss.get('rss_at_end', 0):.0f} MiB",
        ]
    problems = []
    if not report.all_received:
        problems.append("a target did not receive every instance")
    if not report.end_to_end_ok:
        problems.append("pacs-agent did not deliver SEG + SR for every run")
    lines += ["", "result: " + ("OK" if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="sends per target (default 3)")
    parser.add_argument(
        "--quiet", type=float, default=2.0, help="the agent's quiet_seconds (default 2)"
    )
    parser.add_argument(
        "--orthanc-sync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Orthanc SyncStorageArea (fsync of stored files; Orthanc's default: on)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slices < 1:
        parser.error("--runs and --slices must be at least 1")
    report = run_benchmark(args)
    print(render(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.all_received and report.end_to_end_ok else 1  # as the result line says


if __name__ == "__main__":
    sys.exit(main())
