"""Decode the pixel frames of a series into Hounsfield units, on every core, for any syntax.

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
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from agent.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

# Fewer items than this are decoded in the calling process: starting work in the pool costs
# more than it saves.
SERIAL_BELOW = 16
# Chunks handed out per worker: enough for the last chunks to balance the load, few enough that
# the per-task overhead (pickling a chunk, attaching the shared block) stays negligible.
_CHUNKS_PER_WORKER = 8
_MIN_CHUNK = 4

# pydicom tries every installed plugin in its own registration order (GDCM first where
# python-gdcm is installed); we name the plugin instead, so that the decoder is the one chosen and
# tested here and the name `decoder_for` reports is the one that runs. Fastest first, by CPU time
# per 512x512 16-bit CT frame on one thread (bench/README.md): JPEG-LS, CharLS (pyjpegls) 4.3 ms,
# GDCM 5.2 ms, libjpeg 17 ms; JPEG lossless (process 14), GDCM 5.0 ms, libjpeg 8.6 ms; JPEG 2000,
# OpenJPEG (pylibjpeg) 28 ms on one thread, GDCM 30 ms of CPU spread over threads of its own, which
# would only oversubscribe a pool that already runs a process per core. pydicom's GDCM plugin
# refuses 12-bit JPEG extended, the usual kind, so libjpeg decodes that one.
_JPEG_LS = ("pyjpegls", "gdcm", "pylibjpeg")
_JPEG = ("gdcm", "pylibjpeg", "pillow")
_J2K = ("pylibjpeg", "gdcm", "pillow")
_PREFERRED_PLUGINS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        JPEGLSLossless: _JPEG_LS,
        JPEGLSNearLossless: _JPEG_LS,
        JPEGBaseline8Bit: _JPEG,
        JPEGExtended12Bit: ("pylibjpeg", "gdcm", "pillow"),
        JPEGLossless: _JPEG,
        JPEGLosslessSV1: _JPEG,
        JPEG2000Lossless: _J2K,
        JPEG2000: _J2K,
        HTJ2KLossless: _J2K,
        HTJ2KLosslessRPCL: _J2K,
        HTJ2K: _J2K,
        RLELossless: ("pylibjpeg", "pydicom", "gdcm"),
    }
)
_OTHER_PLUGINS = ("pylibjpeg", "pyjpegls", "gdcm", "pillow", "pydicom")
# Transfer syntaxes of PS3.5 A.4 / PS3.6 Table A-1 newer than the pydicom release we pin, named
# here so that a study skipped for them says what it was.
_NAMES_PYDICOM_LACKS = MappingProxyType(
    {
        "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
        "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
        "1.2.840.10008.1.2.4.112": "JPEG XL",
        "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
    }
)
# Where Linux keeps POSIX shared memory (shm_open names are files here).
_SHM_DIR = "/dev/shm"
# PS3.5 9.1: components of digits without leading zeros, at most 64 characters.
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass(frozen=True)
class DecodeItem:
    """One frame to decode and the Modality LUT rescale (PS3.3 C.11.1.1.2) that gives its HU."""

    path: Path
    index: int  # 0-based frame index within the instance (0 for single-frame)
    slope: float
    intercept: float

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"frame index must be >= 0, got {self.index}")
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise ValueError("rescale slope and intercept must be finite")


def _syntax_name(transfer_syntax: str) -> str:
    """`Name (UID)` where the name is known, else the UID alone."""
    uid = transfer_syntax.strip()
    if not uid:
        return "an empty transfer syntax UID"
    if not _is_uid(uid):
        return f"an invalid transfer syntax UID {uid[:64]!r}"
    name = _NAMES_PYDICOM_LACKS.get(uid) or UID(uid).name
    if name == uid:
        return f"transfer syntax {uid}"
    return f"{name} ({uid})"


def _is_uid(text: str) -> bool:
    # pydicom warns about, rather than rejects, malformed UIDs; such text is never a syntax.
    return len(text) <= 64 and _UID_PATTERN.fullmatch(text) is not None


def decoder_for(transfer_syntax: str) -> str | None:
    """The pydicom decoding plugin used for `transfer_syntax`, or None if none is installed.

    The first installed plugin of our preference for the syntax; decode_frames hands this name
    to pydicom. Native (uncompressed or deflated) syntaxes are decoded by pydicom itself:
    "pydicom".
    """
    uid = transfer_syntax.strip()
    if not _is_uid(uid):
        return None
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:
        return None
    if decoder.is_native:
        return "pydicom"
    available = decoder.available_plugins
    preferred = _PREFERRED_PLUGINS.get(uid, ()) + _OTHER_PLUGINS
    return next((name for name in preferred if name in available), None)


def no_decoder_reason(transfer_syntax: str) -> str:
    """Why frames in `transfer_syntax` cannot be decoded, for a study's `skipped:` state."""
    return f"no decoder for {_syntax_name(transfer_syntax)}"


# -- one frame --------------------------------------------------------------------------------


def _stored_frame(item: DecodeItem) -> np.ndarray:
    """The stored values of one frame, as pydicom decodes them; PermanentError if it cannot."""
    name = item.path.name  # the SOP Instance UID in the spool: no patient identity
    try:
        syntax = str(read_file_meta_info(item.path).get("TransferSyntaxUID", "") or "")
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise PermanentError(f"cannot read {name}: {type(exc).__name__}") from exc
    plugin = decoder_for(syntax)
    if plugin is None:
        raise PermanentError(no_decoder_reason(syntax))
    header = Dataset()
    try:
        # pixel_array returns stored values: no Modality or VOI LUT, and with raw=True no
        # colour-space conversion (grayscale is all we accept). Rescaling is ours.
        if syntax == DeflatedExplicitVRLittleEndian:
            # pixel_array(path) does not inflate a deflated dataset (PS3.5 A.5); dcmread does.
            header = pydicom.dcmread(item.path)
            stored = pixel_array(header, index=item.index, raw=True)
        else:
            # From a path, pixel_array reads only the requested frame.
            stored = pixel_array(
                item.path, ds_out=header, index=item.index, decoding_plugin=plugin, raw=True
            )
    except Exception as exc:  # each plugin raises its own types
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise PermanentError(
            f"cannot decode frame {item.index} of {name} ({_syntax_name(syntax)}): "
            f"{type(exc).__name__}" + (f": {detail}" if detail else "")
        ) from exc
    return _sign_extended(stored, header)


def _sign_extended(stored: np.ndarray, header: Dataset) -> np.ndarray:
    """Signed values sign-extended from their HighBit (BitsStored - 1, PS3.5 8.1.1).

    pydicom does this for native data, but for JPEG-LS and JPEG 2000 it extends from the
    codestream's precision, which some encoders (DCMTK's dcmcjpls in its default raw mode) set
    to BitsAllocated with the unused upper bits zero: -1024 in 12 bits would come back as 3072.
    On values already extended this is a no-op.
    """
    if stored.dtype.kind != "i" or int(header.get("PixelRepresentation", 0) or 0) != 1:
        return stored
    shift = stored.dtype.itemsize * 8 - int(header.get("BitsStored", 0) or 0)
    if 0 < shift < stored.dtype.itemsize * 8:
        if not stored.flags.writeable:
            stored = stored.copy()
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)
    return stored


def _checked_frame(item: DecodeItem, shape: tuple[int, int] | None) -> np.ndarray:
    """The stored values of one frame, checked to be grayscale and, if given, of `shape`."""
    stored = _stored_frame(item)
    if stored.ndim != 2:
        samples = stored.shape[-1] if stored.ndim == 3 else "?"
        raise PermanentError(
            f"{item.path.name} frame {item.index} is not grayscale "
            f"(SamplesPerPixel {samples}); only single-sample images can be loaded"
        )
    if shape is not None and stored.shape != shape:
        raise PermanentError(
            f"frames differ in size: {item.path.name} frame {item.index} is "
            f"{stored.shape[0]}x{stored.shape[1]}, the first frame is {shape[0]}x{shape[1]}"
        )
    return stored


def _rescale_into(
    stored: np.ndarray, item: DecodeItem, out: np.ndarray, scratch: np.ndarray
) -> None:
    """out = stored x slope + intercept (PS3.3 C.11.1.1.2), computed in float64 in `scratch`.

    float64 first, so that no 32-bit rounding happens before the one final conversion to
    float32. `scratch` is reused from frame to frame: a fresh 2 MB buffer per 512x512 frame
    costs more in page faults than the arithmetic.
    """
    np.multiply(stored, item.slope, out=scratch)
    scratch += item.intercept
    out[...] = scratch


def _decode_serial(items: Sequence[DecodeItem]) -> np.ndarray:
    first = _checked_frame(items[0], None)
    shape = (int(first.shape[0]), int(first.shape[1]))
    out = np.empty((len(items), *shape), dtype=np.float32)
    scratch = np.empty(shape, dtype=np.float64)
    _rescale_into(first, items[0], out[0], scratch)
    for i, item in enumerate(items[1:], start=1):
        _rescale_into(_checked_frame(item, shape), item, out[i], scratch)
    return out


# -- the pool -----------------------------------------------------------------------------------


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
            stored = _checked_frame(item, frame)
            _rescale_into(stored, item, out[start + offset], scratch)
    finally:
        # The view must go before close(): an exported buffer cannot be unmapped. What raises
        # (_checked_frame) never sees the view, so no traceback frame keeps it alive.
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
    count = _worker_count(workers)
    if count == 1:
        return
    executor = _POOL.get(count)
    # A spawning pool starts a process per submitted task while none is idle.
    for future in [executor.submit(_worker_pid) for _ in range(count)]:
        future.result()


def shutdown_pool() -> None:
    """Stop the decoding pool's processes (also registered with atexit once a pool starts)."""
    _POOL.shutdown()


def _worker_count(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


def _frame_shape(item: DecodeItem) -> tuple[int, int]:
    """Rows and Columns from the header of the first item, to size the shared output block."""
    try:
        ds = pydicom.dcmread(item.path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception as exc:  # any unreadable header; decoding it would fail the same way
        raise PermanentError(
            f"cannot read Rows/Columns of {item.path.name}: {type(exc).__name__}"
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


def _decode_parallel(items: Sequence[DecodeItem], workers: int) -> np.ndarray:
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
        return _decode_serial(items)
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


def decode_frames(items: Sequence[DecodeItem], *, workers: int | None = None) -> np.ndarray:
    """Decode and rescale `items` into a float32 (len(items), rows, cols) array in item order.

    Frames are stored values x slope + intercept (PS3.3 C.11.1.1.2), computed in float64. Uses
    `workers` processes (default: every CPU this process may use) for 16 items or more, the
    calling process otherwise. PermanentError if a frame cannot be decoded (no decoder for its
    transfer syntax, a damaged file), is not grayscale, or differs in size from the first.
    """
    if not items:
        raise PermanentError("no frames to decode")
    count = _worker_count(workers)
    if count == 1 or len(items) < SERIAL_BELOW:
        return _decode_serial(items)
    return _decode_parallel(items, count)
