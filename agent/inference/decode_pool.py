"""Decode frames in a pool of spawned worker processes, into one shared-memory output block.

Decoding is CPU-bound and the codec bindings (pylibjpeg-openjpeg among them) hold the GIL, so
threads do not help: frames are decoded in a pool of worker processes, each handed a chunk of
contiguous items, writing its rescaled frames straight into one shared-memory block that holds the
whole output, so no pixels are pickled back; the caller gets that block as its array, unlinked. The
pool is started with `spawn`: the calling process runs threads (the DICOM listener, the assembler)
and must never be forked.
"""

from __future__ import annotations

import atexit
import logging
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from agent.dicom.files import DICOM_ERRORS, read_header
from agent.errors import PermanentError, RetryableError
from agent.inference.decode import DecodeItem, checked_frame, decode_serial, rescale_into
from agent.logs import instance_key

log = logging.getLogger(__name__)

# Chunks handed out per worker: enough for the last chunks to balance the load, few enough that
# the per-task overhead (pickling a chunk, attaching the shared block) stays negligible.
_CHUNKS_PER_WORKER = 8
_MIN_CHUNK = 4
# Where Linux keeps POSIX shared memory (shm_open names are files here).
_SHM_DIR = "/dev/shm"


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker waits on its task queue forever, so a parent killed outright (OOM killer,
    # SIGKILL) would leave it behind: exit when the parent's sentinel closes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True
        ).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _worker_pid() -> int:
    return os.getpid()


def _decode_chunk(
    shm_name: str, shape: tuple[int, int, int], start: int, items: tuple[DecodeItem, ...]
) -> None:
    """Decode `items` into frames start, start+1, ... of the shared output block (in a worker)."""
    frame = (shape[1], shape[2])
    scratch = np.empty(frame, dtype=np.float64)
    shm = SharedMemory(name=shm_name)
    out = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
    try:
        for offset, item in enumerate(items):
            stored = checked_frame(item, frame)
            rescale_into(stored, item, out[start + offset], scratch)
    finally:
        # The view must go before close(): an exported buffer cannot be unmapped. What raises
        # (checked_frame) never sees the view, so no traceback frame keeps it alive.
        del out
        shm.close()


class _PoolHolder:
    """The process pool of this process, started on first use and reused.

    It is the module's only mutable state: a pool is expensive to start (each spawned worker
    imports numpy and pydicom) and cheap to keep. A process that inherited the holder by fork
    does not own the pool and starts its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._workers = 0
        self._pid = 0
        self._atexit_registered = False

    def get(self, workers: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is not None and self._pid != os.getpid():
                self._executor = None  # inherited by fork: the workers belong to the parent
            if self._executor is not None and self._workers != workers:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                )
                self._workers = workers
                self._pid = os.getpid()
                if not self._atexit_registered:
                    atexit.register(self.shutdown)
                    self._atexit_registered = True
                log.debug("started a decoding pool of %d processes", workers)
            return self._executor

    def discard(self, executor: ProcessPoolExecutor) -> None:
        """Forget a broken pool so that the next call starts a fresh one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            owned = self._pid == os.getpid()
        if executor is not None and owned:
            executor.shutdown(wait=True, cancel_futures=True)


_POOL = _PoolHolder()


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def warm_pool(workers: int | None = None) -> None:
    """Start the decoding pool's processes now (e.g. when a worker starts), not on first use."""
    count = worker_count(workers)
    if count == 1:
        return
    executor = _POOL.get(count)
    # A spawning pool starts a process per submitted task while none is idle.
    for future in [executor.submit(_worker_pid) for _ in range(count)]:
        future.result()


def shutdown_pool() -> None:
    """Stop the decoding pool's processes (also registered with atexit once a pool starts)."""
    _POOL.shutdown()


def worker_count(workers: int | None) -> int:
    """`workers` checked to be at least 1, or default_workers() where it is None."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


def _frame_shape(item: DecodeItem) -> tuple[int, int]:
    """Rows and Columns from the header of the first item, to size the shared output block."""
    try:
        # read_header, not dcmread: a deflated dataset is inflated only within its bound.
        ds = read_header(item.path)
        return int(ds.Rows), int(ds.Columns)
    except PermanentError as exc:
        raise PermanentError(f"cannot read Rows/Columns: {exc}") from exc
    except DICOM_ERRORS as exc:  # decoding it would fail the same way
        raise PermanentError(
            f"cannot read Rows/Columns of {instance_key(item.path)}: {type(exc).__name__}"
        ) from exc


def _chunks(count: int, workers: int) -> list[tuple[int, int]]:
    """(start, stop) of contiguous chunks covering range(count)."""
    size = max(_MIN_CHUNK, math.ceil(count / (workers * _CHUNKS_PER_WORKER)))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _submit(
    shm_name: str, shape: tuple[int, int, int], items: Sequence[DecodeItem], workers: int
) -> tuple[ProcessPoolExecutor, list[Future[None]]]:
    """Hand the chunks to the pool; a pool found broken (a worker died since) is replaced once."""
    for attempt in (1, 2):
        executor = _POOL.get(workers)
        futures: list[Future[None]] = []
        try:
            for start, stop in _chunks(len(items), workers):
                chunk = tuple(items[start:stop])
                futures.append(executor.submit(_decode_chunk, shm_name, shape, start, chunk))
        except BrokenProcessPool:
            _POOL.discard(executor)
            if attempt == 2:
                raise RetryableError("the decoding pool broke while it was being started") from None
            log.warning("a decoding process had died; starting a new pool")
            continue
        return executor, futures
    raise AssertionError("unreachable")


def _shm_room() -> int | None:
    """Free bytes where POSIX shared memory lives (/dev/shm on Linux), None if unknown."""
    try:
        stat = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _adopt(shm: SharedMemory, shape: tuple[int, int, int], nbytes: int) -> np.ndarray:
    """The finished block as an array that holds its own mapping, or a copy where it cannot.

    Mapping the block again (prefaulted in one call) and returning that costs no copy and no
    second volume of memory; page faults on a fresh copy cost more than a fast codec's whole
    decode. The caller unlinks the name: the pages live until the array is freed.
    """
    path = Path(_SHM_DIR, shm.name)
    populate = getattr(mmap, "MAP_POPULATE", 0)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | populate)
        finally:
            os.close(fd)
        return np.frombuffer(mapping, dtype=np.float32).reshape(shape)
    view = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
    try:
        return view.copy()
    finally:
        del view  # before close(): an exported buffer cannot be unmapped


def decode_parallel(items: Sequence[DecodeItem], workers: int) -> np.ndarray:
    """Decode and rescale `items` in the pool of `workers` processes, as decode_frames does."""
    rows, cols = _frame_shape(items[0])
    shape = (len(items), rows, cols)
    nbytes = max(len(items) * rows * cols * np.dtype(np.float32).itemsize, 1)
    room = _shm_room()
    if room is not None and room < nbytes:
        # A worker writing past the end of a full tmpfs dies of SIGBUS; a container's default
        # /dev/shm is 64 MB. Decode in this process instead, slower but sound.
        log.warning(
            "%d MB free in %s, %d MB needed: decoding %d frames in one process",
            room // 10**6,
            _SHM_DIR,
            nbytes // 10**6,
            len(items),
        )
        return decode_serial(items)
    shm = SharedMemory(create=True, size=nbytes)
    try:
        executor, futures = _submit(shm.name, shape, items, workers)
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            # Running chunks still write into the block: let them end before it is unlinked.
            wait(pending)
            error = failed[0].exception()
            if isinstance(error, BrokenProcessPool):
                _POOL.discard(executor)
                # A worker died (killed for memory, or a codec crashed): nothing says that
                # the input is at fault, so the task may try again.
                raise RetryableError(
                    f"a decoding process exited unexpectedly while decoding {len(items)} frames"
                ) from error
            assert error is not None
            raise error
        return _adopt(shm, shape, nbytes)
    finally:
        shm.close()
        shm.unlink()
