"""Soak benchmark: concurrent senders, many studies, every process killed on a schedule.

K storescu senders share N small phantom studies; `pacs-agent serve`, one gpu worker and one io
worker run on our own Redis (nothing on disk) and our own PostgreSQL, with a real Orthanc as the
PACS, and the spool on a filesystem of its own size (a tmpfs, where this user may mount one).
While the studies arrive and are processed, a schedule of faults runs: each kind of process
killed (SIGKILL; Redis kill -9; Orthanc stopped and started), PostgreSQL stopped, the spool disk
filled, a gpu worker sent SIGTERM twice mid-inference, a sender's association aborted mid-study;
each is made while a study is at the step it targets (a spare study is sent when none is) and
undone after a few seconds. A sender whose send fails sends the whole study again, as a
modality does. At the end (bounded wait) it prints studies sent, done, with results in the PACS,
duplicates, lost, the longest delay from the last instance sent to the result in the PACS, and
the faults made. See bench/README.md.

    python -m bench.soak [--senders 4] [--studies 25] [--slices 8] [--size 64]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.db.database import Database
from agent.db.states import IN_FLIGHT, TERMINAL, State
from bench.ingest import workdir
from tests.support.agent import AgentProcess, agent_database, write_config
from tests.support.dcmtk import storescu
from tests.support.faults import RedisServer, kill_hard
from tests.support.orthanc import Orthanc
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.ports import free_port
from tests.support.postgres import Cluster

AET = "PACS_AGENT"
RESULT_MODALITIES = ("SEG", "SR")
SEND_RETRY_S = 1.0  # a modality's pause before sending a failed study again
SEND_ATTEMPTS = 60
SPARES = 5  # studies kept back: one for the aborting sender, the rest to bring a fault a study
MISSED = "no study"  # how a fault that found nothing to interrupt says so


@dataclass
class Sent:
    """One study as its sender saw it."""

    truth: PhantomTruth
    attempts: int = 0
    last_sent: float | None = None  # monotonic, when its last instance was acknowledged
    in_pacs: float | None = None  # monotonic, when SEG and SR were first seen in the PACS


@dataclass
class Kill:
    at: float  # seconds since the start
    what: str
    caught: str  # what the process was doing, as far as the database tells
    down_s: float


@dataclass
class Stack:
    """The processes under test, each restartable by name."""

    root: Path
    config: Path
    port: int
    redis: RedisServer
    pacs: Orthanc
    database: Cluster
    spool: Path
    # Whether the spool is on a filesystem of its own, which a fault may fill.
    spool_mounted: bool
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def start_agent(self, name: str) -> None:
        role = ("serve",) if name == "serve" else ("worker", "--queue", name)
        process = AgentProcess(self.config, *role)
        process.start()
        if name == "serve":
            process.wait_listening(self.port)
        else:
            process.wait_log(" ready.")
        self.agents[name] = process

    def stop_all(self) -> None:
        for process in self.agents.values():
            process.stop()


def log(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


class Sending:
    """How many senders are inside a storescu call right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


def send_study(item: Sent, port: int, sending: Sending, stop: threading.Event) -> None:
    """Send one study whole, again after each failure, as a modality does."""
    while item.attempts < SEND_ATTEMPTS and not stop.is_set():
        item.attempts += 1
        with sending.one():
            result = storescu(
                list(item.truth.files), port=port, called_aet=AET, timeout=30, check=False
            )
        if result.returncode == 0:
            item.last_sent = time.monotonic()
            return
        time.sleep(SEND_RETRY_S)


def sender(
    work: queue.Queue[Sent], port: int, pause: float, sending: Sending, stop: threading.Event
) -> None:
    """Send studies from `work` until it is empty."""
    while not stop.is_set():
        try:
            item = work.get_nowait()
        except queue.Empty:
            return
        send_study(item, port, sending, stop)
        time.sleep(pause)


def pacs_results(pacs: Orthanc) -> tuple[dict[str, collections.Counter[str]], list[str]]:
    """Per StudyInstanceUID the result instances by modality, and every result SOP UID stored."""
    studies = {
        s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in pacs.get_json("/studies?expand")
    }
    by_study: dict[str, collections.Counter[str]] = {}
    sops: list[str] = []
    for series in pacs.get_json("/series?expand"):
        modality = series["MainDicomTags"].get("Modality", "")
        if modality not in RESULT_MODALITIES:
            continue
        uid = studies.get(series["ParentStudy"])
        if uid is None:
            continue
        by_study.setdefault(uid, collections.Counter())[modality] += len(series["Instances"])
        for instance in pacs.get_json(f"/series/{series['ID']}/instances"):
            sops.append(instance["MainDicomTags"]["SOPInstanceUID"])
    return by_study, sops


def watch_pacs(pacs: Orthanc, sent: list[Sent], stop: threading.Event) -> None:
    """Note when each study's SEG and SR first appear in the PACS (polled every second)."""
    while not stop.wait(1.0):
        with contextlib.suppress(OSError, ValueError, KeyError):  # the PACS may be down
            by_study, _ = pacs_results(pacs)
            now = time.monotonic()
            for item in sent:
                found = by_study.get(item.truth.study_uid, collections.Counter())
                if item.in_pacs is None and all(found[m] for m in RESULT_MODALITIES):
                    item.in_pacs = now


def states(db: Database) -> dict[str, State]:
    with contextlib.suppress(Exception):  # SQLite busy while a writer commits: try later
        return {s.study_uid: State(s.state) for s in db.in_states(list(State))}
    return {}


def any_in(db: Database, state: State) -> bool:
    return bool(db.in_states([state]))


def fault_schedule(
    stack: Stack,
    db: Database,
    sending: Sending,
    start: float,
    every: float,
    kills: list[Kill],
    stop: threading.Event,
    spares: list[Sent],
) -> None:
    """Make each fault once, `every` seconds apart, catching a process mid-step: when no study
    is at that step (the senders have finished), one of `spares` is sent to bring one there.
    The aborting sender sends the first spare."""
    spare, extra = spares[0], list(spares[1:])

    def poll(state: State | None, timeout: float) -> str | None:
        # Inference of a small series takes tens of milliseconds: poll fast to land inside it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            if state is None and sending.active:
                return f"{sending.active} senders inside an association"
            if state is not None and any_in(db, state):
                return f"a study {state}"
            time.sleep(0.005)
        return None

    def wait_for(state: State | None, timeout: float) -> str:
        caught = poll(state, min(timeout, 3.0))
        if caught is None and extra:
            item = extra.pop(0)
            threading.Thread(
                target=send_study, args=(item, stack.port, sending, stop), daemon=True
            ).start()
            caught = poll(state, timeout)
            if caught is not None:
                caught += " (a spare study sent for it)"
        return caught or f"{MISSED} {state or 'arriving'} within {timeout:g} s"

    def agent(name: str, state: State | None) -> Callable[[], str]:
        def fault() -> str:
            caught = wait_for(state, 30)
            kill_hard(stack.agents[name].process)
            stack.agents[name].stop()
            time.sleep(1.0)
            stack.start_agent(name)
            return caught

        return fault

    def redis() -> str:
        # Best with jobs on their way: queued, or held unacknowledged by a worker.
        deadline = time.monotonic() + 30
        while not db.in_states(IN_FLIGHT) and time.monotonic() < deadline:
            time.sleep(0.005)
        counts = collections.Counter(str(s.state) for s in db.in_states(IN_FLIGHT))
        caught = "in flight: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or "none")
        stack.redis.crash()
        time.sleep(1.0)
        stack.redis.start()
        return caught

    def orthanc() -> str:
        stack.pacs.stop()  # a clean stop: its index must survive
        time.sleep(5.0)
        stack.pacs.start()
        return "exporting: " + str(len(db.in_states([State.EXPORTING])))

    def database() -> str:
        caught = wait_for(None, 30)
        stack.database.stop()  # -m immediate: every connection cut, as in a crash
        time.sleep(4.0)
        stack.database.start()
        return caught

    def disk_full() -> str:
        if not stack.spool_mounted:
            return "skipped: the spool has no filesystem of its own (mounting needs root)"
        caught = wait_for(None, 30)
        ballast = stack.spool / "ballast"
        with ballast.open("wb") as out:  # every free block, until the disk says no more
            block = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):
                while True:
                    out.write(block)
                    out.flush()
        time.sleep(5.0)
        ballast.unlink()
        return caught

    def double_sigterm() -> str:
        caught = wait_for(State.INFERRING, 30)
        process = stack.agents["gpu"].process
        assert process is not None
        process.send_signal(signal.SIGTERM)  # warm shutdown: the task may finish
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # cold shutdown: the task is cut off
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        stack.agents["gpu"].stop()
        stack.start_agent("gpu")
        return caught

    def aborting_sender() -> str:
        item = spare
        files = list(item.truth.files)
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", stack.port, ae_title=AET)
        with contextlib.suppress(Exception):  # the agent may be restarting: the retry sends all
            for path in files[: len(files) // 2]:
                assoc.send_c_store(pydicom.dcmread(path))
        assoc.abort()
        item.attempts += 1
        time.sleep(SEND_RETRY_S * 5)  # longer than the quiet period: it must wait for this
        send_study(item, stack.port, sending, stop)
        return f"{len(files) // 2} of {len(files)} instances, then A-ABORT; re-sent whole"

    # The faults of arrival first, while the senders still send; then those of processing.
    schedule: list[tuple[str, Callable[[], str]]] = [
        ("serve (SIGKILL while receiving)", agent("serve", None)),
        ("PostgreSQL (stopped for 4 s)", database),
        ("spool disk (full for 5 s)", disk_full),
        ("sender (A-ABORT mid-study)", aborting_sender),
        ("gpu worker (SIGKILL mid-inference)", agent("gpu", State.INFERRING)),
        ("io worker (SIGKILL mid-export)", agent("io", State.EXPORTING)),
        ("Redis (kill -9, restarted empty)", redis),
        ("Orthanc (stopped for 5 s)", orthanc),
        ("serve (SIGKILL after sealing)", agent("serve", State.QUEUED)),
        ("gpu worker (SIGTERM twice mid-inference)", double_sigterm),
    ]
    for what, fault in schedule:
        if stop.wait(every):
            return
        began = time.monotonic()
        caught = fault()
        kills.append(Kill(began - start, what, caught, time.monotonic() - began))
        log(f"killed {what}: {caught}; back after {time.monotonic() - began:.1f} s", start)


@contextlib.contextmanager
def own_filesystem(folder: Path, megabytes: int) -> Iterator[bool]:
    """A tmpfs of `megabytes` at `folder`, so that a fault can fill the spool's disk and
    nothing else; yields False (a plain folder) where this user may not mount."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        # Lazily: a process that has not quite ended may still hold a file there.
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def run(args: argparse.Namespace) -> int:
    with (
        workdir(args.keep, prefix="pacs-agent-soak-") as root,
        contextlib.ExitStack() as stack_exit,
    ):
        start = time.monotonic()
        sent = [
            Sent(
                write_phantom_series(
                    root / "studies" / f"{i:03d}",
                    slices=args.slices,
                    rows=args.size,
                    cols=args.size,
                    seed=i,
                )
            )
            for i in range(args.senders * args.studies)
        ]
        spares = [
            Sent(
                write_phantom_series(
                    root / "studies" / f"spare-{i}",
                    slices=args.slices,
                    rows=args.size,
                    cols=args.size,
                    seed=len(sent) + i,
                )
            )
            for i in range(SPARES)
        ]
        log(f"{len(sent)} studies of {args.slices} slices {args.size}x{args.size} written", start)
        redis = stack_exit.enter_context(RedisServer(root / "redis"))
        pacs = stack_exit.enter_context(Orthanc(root / "pacs"))
        database = stack_exit.enter_context(Cluster())
        spool = root / "agent" / "spool"
        mounted = stack_exit.enter_context(own_filesystem(spool, args.spool_mb))
        port = free_port()
        config = write_config(
            root / "agent",
            port=port,
            broker_url=redis.url,
            database_url=database.url,
            quiet_seconds=args.quiet,
            destinations=[(pacs.aet, "127.0.0.1", pacs.dicom_port)],
        )
        text = config.read_text()
        queue_keys = f"[queue]\nstale_after_seconds = {args.stale}\ntask_time_limit_seconds = 30\n"
        study_keys = f"[study]\nsender_retry_seconds = {args.sender_retry}\n"
        # The spool's filesystem is small: a floor of 5 % lets the disk-full fault cross it.
        spool_keys = "[spool]\nmin_free_percent = 5\nmin_free_gb = 0\n"
        text = text.replace("[queue]\n", queue_keys, 1).replace("[study]\n", study_keys, 1)
        text = text.replace("[spool]\n", spool_keys, 1)
        config.write_text(text)
        stack = Stack(root, config, port, redis, pacs, database, spool, mounted)
        stack_exit.callback(stack.stop_all)
        for name in ("serve", "gpu", "io"):
            stack.start_agent(name)
        db = stack_exit.enter_context(agent_database(config))
        log("serve, gpu worker, io worker, Redis and Orthanc running", start)

        stop = threading.Event()
        stack_exit.callback(stop.set)
        work: queue.Queue[Sent] = queue.Queue()
        for item in sent:
            work.put(item)
        kills: list[Kill] = []
        sending = Sending()
        began = time.monotonic()
        threads = [
            threading.Thread(
                target=sender, args=(work, port, args.pause, sending, stop), daemon=True
            )
            for _ in range(args.senders)
        ]
        faults = threading.Thread(
            target=fault_schedule,
            args=(stack, db, sending, began, args.every, kills, stop, spares),
            daemon=True,
        )
        watcher = threading.Thread(
            target=watch_pacs, args=(pacs, [*sent, *spares], stop), daemon=True
        )
        for thread in [*threads, faults, watcher]:
            thread.start()
        for thread in threads:
            thread.join()
        log("senders finished", start)
        faults.join()
        sent.extend(s for s in spares if s.attempts)  # the spares the faults sent count too
        log("fault schedule finished; waiting for the results", start)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = [s for s in sent if s.last_sent is not None and s.in_pacs is not None]
            ended = states(db)
            if len(done) == len(sent) or all(
                ended.get(s.truth.study_uid) in TERMINAL for s in sent
            ):
                break
            time.sleep(1.0)
        time.sleep(args.settle)  # a duplicate still on its way arrives now
        stop.set()
        watcher.join()
        by_study, sops = pacs_results(pacs)
        ended = states(db)
        for name, process in stack.agents.items():
            if process.process is None or process.process.poll() is not None:
                print(f"WARNING: {name} is not running at the end", file=sys.stderr)
        return report(args, sent, by_study, sops, ended, kills)


def report(
    args: argparse.Namespace,
    sent: list[Sent],
    by_study: dict[str, collections.Counter[str]],
    sops: list[str],
    ended: dict[str, State],
    kills: list[Kill],
) -> int:
    delivered = [s for s in sent if s.last_sent is not None]
    with_results = [
        s
        for s in delivered
        if all(by_study.get(s.truth.study_uid, {}).get(m) for m in RESULT_MODALITIES)
    ]
    duplicated = [
        s
        for s in delivered
        if any(by_study.get(s.truth.study_uid, {}).get(m, 0) > 1 for m in RESULT_MODALITIES)
    ]
    twice = [uid for uid, n in collections.Counter(sops).items() if n > 1]
    lost = [s for s in delivered if s not in with_results]
    delays = [s.in_pacs - s.last_sent for s in with_results if s.in_pacs and s.last_sent]
    resends = sum(s.attempts - 1 for s in sent)
    print(
        f"pacs-agent soak: {args.senders} senders x {args.studies} studies, "
        f"{args.slices} slices {args.size}x{args.size}, quiet {args.quiet:g} s, "
        f"stale after {args.stale:g} s"
    )
    print(f"studies sent:               {len(delivered)} of {len(sent)} ({resends} re-sends)")
    done = [s for s in sent if ended.get(s.truth.study_uid) == State.DONE]
    print(f"studies done:               {len(done)}")
    print(f"studies with results (PACS): {len(with_results)}")
    print(
        f"duplicates:                 {len(duplicated) + len(twice)}"
        f" ({len(duplicated)} studies with >1 SEG or SR, {len(twice)} SOP UIDs stored twice)"
    )
    print(f"lost:                       {len(lost)}")
    longest = max(delays, default=float("nan"))
    print(f"longest delay:              {longest:.1f} s (last instance sent -> SEG+SR in PACS)")
    final = collections.Counter(str(ended.get(s.truth.study_uid, "unknown")) for s in sent)
    print(f"final states:               {dict(final)}")
    print("faults:")
    for kill in kills:
        print(f"  {kill.at:6.1f} s  {kill.what}: {kill.caught}; down {kill.down_s:.1f} s")
    for s in lost:
        print(f"  lost: study {s.truth.study_uid[-12:]} state {ended.get(s.truth.study_uid)}")
    kinds = {k.what.split(" ")[0] for k in kills}
    missed = [k for k in kills if k.caught.startswith(MISSED)]
    met = (
        not missed
        and not lost
        and not duplicated
        and not twice
        and len(delivered) == len(sent)
        and {"serve", "gpu", "io", "Redis", "Orthanc", "PostgreSQL", "sender"} <= kinds
    )
    print(
        "target (0 lost, 0 duplicates, every fault made at its moment): "
        + ("PASS" if met else "FAIL")
    )
    return 0 if met else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=25, help="studies per sender")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="rows and columns")
    parser.add_argument(
        "--pause", type=float, default=2.0, help="seconds between a sender's studies"
    )
    parser.add_argument("--quiet", type=float, default=3.0, help="[study] quiet_seconds")
    parser.add_argument("--stale", type=float, default=15.0, help="[queue] stale_after_seconds")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument(
        "--sender-retry", type=float, default=30.0, help="[study] sender_retry_seconds"
    )
    parser.add_argument(
        "--spool-mb", type=int, default=1024, help="size of the spool's own filesystem"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="bounded final wait")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
