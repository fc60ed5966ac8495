"""decode_frames: every common transfer syntax from real encoders, serial and on a process pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    MPEG2MPML,
    JPEG2000Lossless,
)

import agent.inference.decode_pool as decode_pool_module
from agent.errors import PermanentError
from agent.inference.decode import DecodeItem, decode_frames, decoder_for, no_decoder_reason
from agent.inference.decode_pool import shutdown_pool, warm_pool
from agent.logs import instance_key
from tests.support.ci import unavailable
from tests.support.data import REPO_ROOT, dicom_files, shared_data
from tests.support.encodings import (
    BY_LABEL,
    ENCODINGS,
    JLS_NEAR,
    Encoding,
    decompress_series,
    encode_series,
    encoder_missing,
    multiframe,
    native_hu,
    reduce_bits,
    rescale_of,
    to_signed,
    with_unknown_codec,
)
from tests.support.phantom import write_phantom_series

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"

# Lossy encodings: the largest error a working decoder shows here, with margin, as (max |HU|,
# RMS HU). A decoder that swaps bytes, loses the sign or drops a bit plane is off by hundreds.
# JPEG baseline is in units of RescaleSlope: its 8-bit variant stores HU on a grid of slope HU.
LOSSY_BOUNDS: dict[str, tuple[float, float]] = {
    "jpeg-baseline": (32.0, 3.0),  # x slope; measured: max 20, RMS 2.0 (quality 90, sharp edges)
    "jpeg-extended": (40.0, 6.0),  # measured: max 18, RMS 3.9
    "j2k-lossy": (120.0, 16.0),  # ratio 10; measured: max 60, RMS 10.8
    "htj2k-lossy": (140.0, 18.0),  # measured: max 70, RMS 12.0
}

# "ct": the shared real CT (512x512, 12 bits stored, unsigned); "phantom": a synthetic series
# (16 bits stored, unsigned); "phantom-signed": the phantom as signed 12-bit values whose upper
# four bits are zero, so that every decoder path must sign-extend from the HighBit itself.
SERIES = ("ct", "phantom", "phantom-signed")
# DCMTK refuses signed near-lossless JPEG-LS; baseline and extended variants are unsigned
# (reduce_bits), the same as the phantom's.
_NOT_FOR_SIGNED = {"jpeg-ls-near", "jpeg-baseline", "jpeg-extended"}
CASES = [
    pytest.param(series, encoding, id=f"{series}-{encoding.label}")
    for series in SERIES
    for encoding in ENCODINGS
    if not (series == "phantom-signed" and encoding.label in _NOT_FOR_SIGNED)
]


class Corpus:
    """Every test series and its encodings, each made once per session on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._native: dict[str, list[Path]] = {}
        self._encoded: dict[tuple[str, str], tuple[list[Path], list[Path]]] = {}

    def native(self, series: str) -> list[Path]:
        """The series as Explicit VR Little Endian files, in slice order: the reference."""
        if series not in self._native:
            if series == "ct":
                originals = dicom_files(shared_data("ct-siemens-j2k"))
                files = decompress_series(originals, self.root / "ct-native")
            elif series == "phantom":
                truth = write_phantom_series(
                    self.root / "phantom-native", slices=8, rows=128, cols=128, shuffle_names=False
                )
                files = list(truth.files)
            elif series == "phantom-signed":
                files = to_signed(self.native("phantom"), 12, self.root / "phantom-signed-native")
            else:
                raise ValueError(series)
            self._native[series] = files
        return self._native[series]

    def encoded(self, series: str, encoding: Encoding) -> tuple[list[Path], list[Path]]:
        """(files in the encoding's syntax, the native files they were encoded from)."""
        key = (series, encoding.label)
        if key not in self._encoded:
            missing = encoder_missing(encoding.syntax)
            if missing is not None:
                unavailable(f"cannot make {encoding.label} test files: {missing}")
            source = self.native(series)
            if encoding.bits is not None:
                source = reduce_bits(
                    source, encoding.bits, self.root / f"{series}-{encoding.bits}bit"
                )
            out = encode_series(source, encoding.syntax, self.root / f"{series}-{encoding.label}")
            self._encoded[key] = (out, source)
        return self._encoded[key]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("encodings"))


@pytest.fixture(scope="module", autouse=True)
def _pool() -> Iterator[None]:
    """One decoding pool for the module, started up front, stopped at the end."""
    warm_pool(2)
    yield
    shutdown_pool()


def items_of(files: Sequence[Path]) -> list[DecodeItem]:
    return [DecodeItem(f, 0, *rescale_of(f)) for f in files]


def reference(files: Sequence[Path]) -> np.ndarray:
    """HU of native files, read without pydicom's pixel decoders."""
    return np.concatenate([native_hu(f) for f in files])


# -- decoder_for and no_decoder_reason ---------------------------------------------------------


# The plugin each syntax gets with every pinned decoder package installed (pyproject.toml).
PINNED_PLUGIN = {
    "rle": "pylibjpeg",
    "jpeg-baseline": "gdcm",
    "jpeg-extended": "pylibjpeg",
    "jpeg-lossless": "gdcm",
    "jpeg-lossless-sv1": "gdcm",
    "jpeg-ls": "pyjpegls",
    "jpeg-ls-near": "pyjpegls",
    "j2k": "pylibjpeg",
    "j2k-lossy": "pylibjpeg",
    "htj2k": "pylibjpeg",
    "htj2k-rpcl": "pylibjpeg",
    "htj2k-lossy": "pylibjpeg",
}


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.label)
def test_every_common_syntax_has_the_chosen_decoder(encoding: Encoding) -> None:
    assert decoder_for(encoding.syntax) == PINNED_PLUGIN.get(encoding.label, "pydicom")


@pytest.mark.parametrize(
    ("syntax", "reason"),
    [
        (JPEG_XL_LOSSLESS, f"no decoder for JPEG XL Lossless ({JPEG_XL_LOSSLESS})"),
        (MPEG2MPML, f"no decoder for MPEG2 Main Profile / Main Level ({MPEG2MPML})"),
        ("1.2.3.4", "no decoder for transfer syntax 1.2.3.4"),
        ("", "no decoder for an empty transfer syntax UID"),
        ("not a UID", "no decoder for an invalid transfer syntax UID 'not a UID'"),
    ],
)
def test_syntaxes_without_decoder_are_named(syntax: str, reason: str) -> None:
    assert decoder_for(syntax) is None
    assert no_decoder_reason(syntax) == reason


# -- every syntax, against the reference -------------------------------------------------------


@pytest.mark.parametrize(("series", "encoding"), CASES)
def test_decodes_syntax_to_reference_hu(corpus: Corpus, series: str, encoding: Encoding) -> None:
    files, source = corpus.encoded(series, encoding)
    for path in files:
        # An encoder that silently did nothing would leave the source syntax here.
        assert read_file_meta_info(path).TransferSyntaxUID == encoding.syntax
    hu = decode_frames(items_of(files))
    expected = reference(source)
    assert hu.dtype == np.float32
    assert hu.shape == expected.shape
    if encoding.lossless:
        np.testing.assert_array_equal(hu, expected)
        return
    error = np.abs(hu.astype(np.float64) - expected)
    # Lossy DCMTK codecs may rescale each image anew (dcmcjpeg +sp): the files' own slopes count.
    slope = max(rescale_of(f)[0] for f in files)
    if encoding.label == "jpeg-ls-near":
        # PS3.5 8.2.3 / ISO/IEC 14495-1: no stored value is off by more than NEAR.
        assert float(error.max()) <= JLS_NEAR * slope
        return
    max_bound, rms_bound = LOSSY_BOUNDS[encoding.label]
    unit = slope if encoding.label == "jpeg-baseline" else 1.0
    assert float(error.max()) <= max_bound * unit
    assert float(np.sqrt((error**2).mean())) <= rms_bound * unit


@pytest.mark.parametrize("bits", [8, 12])
def test_reduced_bit_variants_keep_hounsfield_units(corpus: Corpus, bits: int) -> None:
    """The sources of JPEG baseline and extended: HU kept exactly (12) or within slope/2 (8)."""
    original = corpus.native("phantom")
    reduced = reduce_bits(original, bits, corpus.root / f"check-{bits}bit")
    slope = rescale_of(reduced[0])[0]
    error = np.abs(reference(reduced).astype(np.float64) - reference(original))
    assert float(error.max()) <= (0.0 if bits == 12 else slope / 2 + 1e-3)
    assert pydicom.dcmread(reduced[0], stop_before_pixels=True).BitsStored == bits


# -- the parallel path --------------------------------------------------------------------------


def test_parallel_equals_serial_exactly(corpus: Corpus, shm_names: list[str]) -> None:
    files, _ = corpus.encoded("ct", BY_LABEL["j2k"])
    items = items_of(files) * 2  # 40 frames: several chunks per worker
    serial = decode_frames(items, workers=1)
    parallel = decode_frames(items, workers=2)
    np.testing.assert_array_equal(parallel, serial)
    # The result is the caller's own: its block is unlinked, another call does not touch it,
    # and it can be written to.
    assert len(shm_names) == 1 and not Path("/dev/shm", shm_names[0]).exists()
    decode_frames(items[::-1], workers=2)
    np.testing.assert_array_equal(parallel, serial)
    parallel[0] = 0.0
    assert parallel.dtype == np.float32 and parallel.shape == (40, 512, 512)


def test_too_little_shared_memory_falls_back_to_one_process(
    corpus: Corpus,
    monkeypatch: pytest.MonkeyPatch,
    shm_names: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker writing past a full /dev/shm (64 MB in a container) would die of SIGBUS."""
    monkeypatch.setattr(decode_pool_module, "_shm_room", lambda: 10**6)
    files, source = corpus.encoded("ct", BY_LABEL["rle"])
    with caplog.at_level("WARNING", logger="agent.inference.decode_pool"):
        hu = decode_frames(items_of(files), workers=2)
    np.testing.assert_array_equal(hu, reference(source))
    assert shm_names == []
    assert "decoding 20 frames in one process" in caplog.text


def test_frames_come_back_in_item_order(corpus: Corpus) -> None:
    files, source = corpus.encoded("ct", BY_LABEL["j2k"])
    order = np.random.default_rng(7).permutation(len(files))
    hu = decode_frames([items_of(files)[i] for i in order], workers=2)
    np.testing.assert_array_equal(hu, reference(source)[order])


def test_one_call_may_mix_transfer_syntaxes(corpus: Corpus) -> None:
    labels = ["j2k", "rle", "jpeg-ls", "explicit-be", "deflated", "jpeg-lossless-sv1"]
    encoded = [corpus.encoded("ct", BY_LABEL[label])[0] for label in labels]
    files = [encoded[i % len(labels)][i] for i in range(len(encoded[0]))]
    hu = decode_frames(items_of(files), workers=2)
    np.testing.assert_array_equal(hu, reference(corpus.native("ct")))


def test_rescale_is_computed_in_float64_then_stored_as_float32(corpus: Corpus) -> None:
    files = corpus.native("phantom")[:1] * 16
    slope, intercept = 0.1, -1024.3
    hu = decode_frames([DecodeItem(f, 0, slope, intercept) for f in files], workers=2)
    stored = np.frombuffer(pydicom.dcmread(files[0]).PixelData, dtype="<u2").reshape(128, 128)
    expected = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    for frame in hu:
        np.testing.assert_array_equal(frame, expected)


# -- multi-frame instances ----------------------------------------------------------------------


@pytest.mark.parametrize("label", ["explicit-le", "rle", "j2k", "htj2k"])
def test_multiframe_index_selects_the_frame(corpus: Corpus, tmp_path: Path, label: str) -> None:
    encoding = BY_LABEL[label]
    if (missing := encoder_missing(encoding.syntax)) is not None:
        unavailable(f"cannot make {label} test files: {missing}")
    singles = corpus.native("phantom")
    native = multiframe(singles, tmp_path / "native" / "mf.dcm")
    path = encode_series([native], encoding.syntax, tmp_path / label)[0]
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == len(singles)
    order = [5, 0, 7, 3, 3, 1, 2, 6, 4] * 2  # 18 items: the parallel path; a repeat too
    slope, intercept = rescale_of(path)
    hu = decode_frames([DecodeItem(path, i, slope, intercept) for i in order], workers=2)
    np.testing.assert_array_equal(hu, reference(singles)[order])


def test_real_multiframe_ct_matches_its_single_frame_slices() -> None:
    folder = shared_data("dcmqi", "23x38x3")
    path = folder / "multiframe" / "mf.dcm"
    singles = dicom_files(folder / "image")
    order = [2, 0, 1]
    # Legacy Converted Enhanced CT keeps the rescale in its functional groups (identity here).
    hu = decode_frames([DecodeItem(path, i, 1.0, 0.0) for i in order])
    np.testing.assert_array_equal(hu, decode_frames(items_of([singles[i] for i in order])))


# -- what is refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_of_different_size_are_refused(corpus: Corpus, workers: int) -> None:
    ct = items_of(corpus.native("ct"))
    odd = items_of(corpus.native("phantom"))[0]
    items = [*ct[:10], odd, *ct[10:]]
    with pytest.raises(PermanentError, match=r"frames differ in size: .* is 128x128, the first"):
        decode_frames(items, workers=workers)


def _rgb_copy(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    gray = np.frombuffer(ds.PixelData, dtype="<u2").reshape(int(ds.Rows), int(ds.Columns))
    rgb = np.repeat((gray >> 4).astype(np.uint8)[..., None], 3, axis=2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    ds["PixelData"].VR = "OB"
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("workers", [1, 2])
def test_colour_images_are_refused(corpus: Corpus, tmp_path: Path, workers: int) -> None:
    phantom = corpus.native("phantom")
    colour = _rgb_copy(phantom[0], tmp_path / "colour.dcm")
    items = [*items_of(phantom[1:]) * 3, DecodeItem(colour, 0, 1.0, 0.0)]
    key = instance_key(colour)
    with pytest.raises(PermanentError, match=rf"{key} frame 0 is not grayscale \("):
        decode_frames(items, workers=workers)


@pytest.mark.parametrize("syntax", [JPEG_XL_LOSSLESS, MPEG2MPML])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_syntax_without_decoder_is_refused_with_its_name(
    corpus: Corpus, tmp_path: Path, syntax: str, workers: int
) -> None:
    phantom = corpus.native("phantom")
    unknown = with_unknown_codec(phantom[0], syntax, tmp_path / "unknown.dcm")
    items = [*items_of(phantom) * 2, DecodeItem(unknown, 0, 1.0, -1024.0)]
    with pytest.raises(PermanentError) as caught:
        decode_frames(items, workers=workers)
    assert str(caught.value) == no_decoder_reason(syntax)
    assert str(caught.value).startswith("no decoder for ")


def _damaged_copy(src: Path, dst: Path) -> Path:
    """A copy whose codestream stops after its first 64 bytes (main header only)."""
    ds = pydicom.dcmread(src)
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream[:64]])
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture
def shm_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the shared-memory blocks decode_frames creates during the test."""
    names: list[str] = []
    original = SharedMemory

    def recording(*args: Any, **kwargs: Any) -> SharedMemory:
        shm = original(*args, **kwargs)
        names.append(shm.name)
        return shm

    monkeypatch.setattr(decode_pool_module, "SharedMemory", recording)
    return names


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_file_names_file_and_syntax_and_leaks_nothing(
    corpus: Corpus, tmp_path: Path, shm_names: list[str], workers: int
) -> None:
    files, _ = corpus.encoded("ct", BY_LABEL["j2k"])
    damaged = _damaged_copy(files[3], tmp_path / "1.2.826.0.1.3680043.8.498.1.dcm")
    items = items_of(files)
    items[3] = DecodeItem(damaged, 0, *rescale_of(files[3]))
    with pytest.raises(PermanentError) as caught:
        decode_frames(items, workers=workers)
    message = str(caught.value)
    assert message.startswith(f"cannot decode frame 0 of {instance_key(damaged)} (JPEG 2000 Image ")
    assert damaged.stem not in message  # the file is named by its SOP Instance UID
    assert JPEG2000Lossless in message and "Traceback" not in message and "\n" not in message
    # The shared output block is gone, and the pool still works.
    assert all(not Path("/dev/shm", name).exists() for name in shm_names)
    assert len(shm_names) == (1 if workers == 2 else 0)
    assert decode_frames(items_of(files), workers=workers).shape == (20, 512, 512)


def test_empty_input_and_bad_arguments_are_refused(corpus: Corpus) -> None:
    with pytest.raises(PermanentError, match="no frames to decode"):
        decode_frames([])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        decode_frames(items_of(corpus.native("phantom")), workers=0)
    with pytest.raises(ValueError, match="frame index"):
        DecodeItem(Path("x.dcm"), -1, 1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        DecodeItem(Path("x.dcm"), 0, float("nan"), 0.0)


# -- the pool's processes -------------------------------------------------------------------------


def _pool_workers() -> list[psutil.Process]:
    return [
        child for child in psutil.Process().children() if "spawn_main" in " ".join(child.cmdline())
    ]


def test_a_pool_whose_worker_died_is_replaced(corpus: Corpus) -> None:
    shutdown_pool()
    before = {p.pid for p in _pool_workers()}  # other spawned children of this process
    warm_pool(2)
    workers = [p for p in _pool_workers() if p.pid not in before]
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(10)
    time.sleep(0.5)  # the pool notices the death and marks itself broken
    files, source = corpus.encoded("ct", BY_LABEL["rle"])
    np.testing.assert_array_equal(decode_frames(items_of(files), workers=2), reference(source))


def test_pool_workers_exit_when_their_parent_is_killed(corpus: Corpus, tmp_path: Path) -> None:
    """A parent killed outright (OOM killer) must not leave its decoding processes behind."""
    script = textwrap.dedent(
        """
        import sys
        from agent.inference.decode_pool import warm_pool

        if __name__ == "__main__":
            warm_pool(2)
            print("ready", flush=True)
            sys.stdin.read()
        """
    )
    (tmp_path / "parent.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, str(tmp_path / "parent.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    ) as parent:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        children = [
            c
            for c in psutil.Process(parent.pid).children()
            if "spawn_main" in " ".join(c.cmdline())
        ]
        assert len(children) == 2
        parent.kill()
        parent.wait(10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()  # ours: do not leave them behind even when the test fails
        assert not alive, "decoding processes outlived their parent"
