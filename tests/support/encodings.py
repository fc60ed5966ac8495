"""Re-encode a DICOM series into every common transfer syntax with real encoders, for decoders.

Encoders: DCMTK (dcmconv, dcmcrle, dcmcjpeg, dcmcjpls) wherever it has one, pydicom's JPEG 2000
encoder (pylibjpeg-openjpeg) and, for HTJ2K, imagecodecs (OpenJPH), which no pinned package
encodes. Every source is a native (uncompressed) series: `decompress_series` makes one from a
compressed original, `reduce_bits` fits it into the 8 or 12 bits of JPEG baseline or extended,
`to_signed` makes a signed variant. Each output file is checked to carry the target transfer
syntax, so an encoder that silently does nothing is caught here.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.support.dcmtk import dcmtk_tool

JLS_NEAR = 2  # JPEG-LS near-lossless: largest allowed error of a stored value (PS3.5 8.2.3)
J2K_RATIO = 10.0  # JPEG 2000 lossy compression ratio
HTJ2K_LEVEL = 0.0005  # HTJ2K lossy quantisation step, relative to the full range
_HTJ2K_RPCL = 2  # progression order code of RPCL in the COD marker (ISO/IEC 15444-1 A.6.1)


@dataclass(frozen=True)
class Encoding:
    """One target transfer syntax, how it is made, and what a decoder must reproduce."""

    label: str
    syntax: UID
    lossless: bool
    tool: str
    bits: int | None = None  # the source must first fit this many stored bits (reduce_bits)
    unsigned_only: bool = False  # the encoder refuses signed stored values


ENCODINGS: tuple[Encoding, ...] = (
    Encoding("implicit-le", ImplicitVRLittleEndian, True, "dcmconv +ti"),
    Encoding("explicit-le", ExplicitVRLittleEndian, True, "dcmconv +te"),
    Encoding("explicit-be", ExplicitVRBigEndian, True, "dcmconv +tb"),
    Encoding("deflated", DeflatedExplicitVRLittleEndian, True, "dcmconv +td"),
    Encoding("rle", RLELossless, True, "dcmcrle"),
    Encoding("jpeg-baseline", JPEGBaseline8Bit, False, "dcmcjpeg +eb", bits=8),
    Encoding("jpeg-extended", JPEGExtended12Bit, False, "dcmcjpeg +ee", bits=12),
    Encoding("jpeg-lossless", JPEGLossless, True, "dcmcjpeg +el"),
    Encoding("jpeg-lossless-sv1", JPEGLosslessSV1, True, "dcmcjpeg +e1"),
    Encoding("jpeg-ls", JPEGLSLossless, True, "dcmcjpls +el"),
    Encoding(
        "jpeg-ls-near",
        JPEGLSNearLossless,
        False,
        f"dcmcjpls +en +md {JLS_NEAR}",
        unsigned_only=True,  # "Unsupported pixel representation for near-lossless JPEG-LS"
    ),
    Encoding("j2k", JPEG2000Lossless, True, "pydicom (openjpeg)"),
    Encoding("j2k-lossy", JPEG2000, False, f"pydicom (openjpeg), ratio {J2K_RATIO:g}"),
    Encoding("htj2k", HTJ2KLossless, True, "imagecodecs (OpenJPH)"),
    Encoding("htj2k-rpcl", HTJ2KLosslessRPCL, True, "imagecodecs (OpenJPH), RPCL + TLM"),
    Encoding("htj2k-lossy", HTJ2K, False, f"imagecodecs (OpenJPH), step {HTJ2K_LEVEL:g}"),
)
BY_LABEL = {e.label: e for e in ENCODINGS}

_DCMTK_ARGS: dict[str, list[str]] = {
    ImplicitVRLittleEndian: ["dcmconv", "+ti"],
    ExplicitVRLittleEndian: ["dcmconv", "+te"],
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
    RLELossless: ["dcmcrle", "+un"],
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb", "+un"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee", "+un"],
    JPEGLossless: ["dcmcjpeg", "+el", "+un"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1", "+un"],
    JPEGLSLossless: ["dcmcjpls", "+el", "+un"],
    JPEGLSNearLossless: ["dcmcjpls", "+en", "+md", str(JLS_NEAR), "+un"],
}


def encoder_missing(syntax: str) -> str | None:
    """Why no encoder for `syntax` is installed here, or None if there is one."""
    if syntax in _DCMTK_ARGS:
        try:
            dcmtk_tool(_DCMTK_ARGS[syntax][0])
        except FileNotFoundError as exc:
            return str(exc)
        return None
    if syntax in (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K):
        try:
            import imagecodecs
        except ImportError:
            return "no HTJ2K encoder: install imagecodecs (OpenJPH) to make HTJ2K test files"
        if not imagecodecs.HTJ2K.available:
            return "imagecodecs was built without HTJ2K (OpenJPH)"
        return None
    if syntax in (JPEG2000Lossless, JPEG2000):
        from pydicom.pixels.encoders.base import get_encoder

        if not get_encoder(syntax).is_available:
            return "pydicom has no JPEG 2000 encoder (install pylibjpeg-openjpeg)"
        return None
    return f"no encoder known for {UID(syntax).name}"


def _run_jobs(
    job: Callable[[Path, Path], None], pairs: Sequence[tuple[Path, Path]], *, threads: int
) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda pair: job(*pair), pairs))


def _run(args: Sequence[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {(result.stderr or result.stdout)[-500:]}")


def _pydicom_j2k(syntax: UID) -> Callable[[Path, Path], None]:
    def job(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        ratio = [J2K_RATIO] if syntax == JPEG2000 else None
        ds.compress(syntax, j2k_cr=ratio, generate_instance_uid=False)
        ds.save_as(dst, enforce_file_format=True)

    return job


def _htj2k(syntax: UID) -> Callable[[Path, Path], None]:
    import imagecodecs

    def job(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
        lossy = syntax == HTJ2K
        # PS3.5 10.18: the RPCL syntax needs RPCL progression and TLM markers; OpenJPH writes
        # RPCL by default.
        streams = [
            bytes(
                imagecodecs.htj2k_encode(
                    np.ascontiguousarray(f),
                    level=HTJ2K_LEVEL if lossy else None,
                    reversible=not lossy,
                    tlm=syntax == HTJ2KLosslessRPCL,
                )
            )
            for f in frames
        ]
        for stream in streams:
            cod = stream.find(b"\xff\x52")
            if syntax == HTJ2KLosslessRPCL and (cod < 0 or stream[cod + 5] != _HTJ2K_RPCL):
                raise RuntimeError("HTJ2K encoder did not write RPCL progression order")
        ds.PixelData = encapsulate(streams)
        ds["PixelData"].VR = "OB"
        if syntax == HTJ2K:
            ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(dst, enforce_file_format=True)

    return job


def _dcmtk(syntax: UID) -> Callable[[Path, Path], None]:
    tool, *options = _DCMTK_ARGS[syntax]
    binary = str(dcmtk_tool(tool))

    def job(src: Path, dst: Path) -> None:
        _run([binary, *options, str(src), str(dst)])

    return job


def encode_series(src_files: Sequence[Path], syntax: UID, out_dir: Path) -> list[Path]:
    """Encode every file of a native series into `syntax` in `out_dir`; the new paths, in order.

    File names are kept (they are the SOP Instance UIDs). RuntimeError if an encoder fails or
    leaves a file in another transfer syntax.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # DCMTK tools take one file per call: run them side by side. The in-process encoders run one
    # at a time: pylibjpeg-openjpeg's encoder crashes when two threads use it at once.
    threads = 1
    if syntax in _DCMTK_ARGS:
        job, threads = _dcmtk(syntax), 4
    elif syntax in (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K):
        job = _htj2k(syntax)
    elif syntax in (JPEG2000Lossless, JPEG2000):
        job = _pydicom_j2k(syntax)
    else:
        raise ValueError(f"no encoder for {syntax.name}")
    pairs = [(Path(src), out_dir / Path(src).name) for src in src_files]
    _run_jobs(job, pairs, threads=threads)
    for _, dst in pairs:
        meta = pydicom.filereader.read_file_meta_info(dst)
        if meta.TransferSyntaxUID != syntax:
            raise RuntimeError(f"{dst.name} is {meta.TransferSyntaxUID.name}, not {syntax.name}")
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        if "ModalityLUTSequence" in ds:
            # A lossy DCMTK codec may replace the rescale by a LUT; decoders do not apply LUTs.
            raise RuntimeError(f"{dst.name}: the encoder wrote a Modality LUT Sequence")
    return [dst for _, dst in pairs]


def _rewrite(src: Path, dst: Path, change: Callable[[Dataset, np.ndarray], np.ndarray]) -> None:
    """Copy a native file with its stored values (and header) changed by `change`."""
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError(f"{src.name}: expected a native transfer syntax")
    stored = change(ds, ds.pixel_array)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if stored.dtype.itemsize == 1 else "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)


def decompress_series(src_files: Sequence[Path], out_dir: Path) -> list[Path]:
    """Explicit VR Little Endian copies of a series, decoded with GDCM where it is installed.

    GDCM is not the decoder under test (pylibjpeg), so a reference made with it is independent.
    """
    from pydicom.pixels.decoders.base import get_decoder

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for src in src_files:
        ds = pydicom.dcmread(src)
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed:
            plugins = get_decoder(syntax).available_plugins
            plugin = "gdcm" if "gdcm" in plugins else ""
            ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dst = out_dir / Path(src).name
        ds.save_as(dst, enforce_file_format=True)
        paths.append(dst)
    return paths


def _series_range(src_files: Sequence[Path]) -> tuple[int, int]:
    values = [pydicom.dcmread(f).pixel_array for f in src_files]
    return min(int(v.min()) for v in values), max(int(v.max()) for v in values)


def reduce_bits(src_files: Sequence[Path], bits: int, out_dir: Path) -> list[Path]:
    """A copy of a native series whose unsigned stored values fit `bits` bits, HU kept.

    The series minimum moves to stored value 0 and RescaleIntercept follows, so that HU are
    identical when the range fits; otherwise values are divided by the smallest integer factor
    that fits and RescaleSlope grows by it (HU then lie on a coarser grid, within slope/2).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    low, high = _series_range(src_files)
    factor = max(1, math.ceil((high - low) / (2**bits - 1)))

    def change(ds: Dataset, stored: np.ndarray) -> np.ndarray:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = np.rint((stored.astype(np.int64) - low) / factor)
        ds.RescaleSlope = f"{slope * factor:g}"
        ds.RescaleIntercept = f"{intercept + low * slope:g}"
        ds.BitsAllocated = 8 if bits <= 8 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        reduced: np.ndarray = values.astype(np.uint8 if bits <= 8 else np.uint16)
        return reduced

    paths = [out_dir / Path(f).name for f in src_files]
    for src, dst in zip(src_files, paths, strict=True):
        _rewrite(Path(src), dst, change)
    return paths


def to_signed(src_files: Sequence[Path], bits: int, out_dir: Path) -> list[Path]:
    """A signed copy (PixelRepresentation 1, `bits` stored) of a native series, HU kept.

    Stored values are the HU themselves (slope 1, intercept 0), so slope must be 1 and the
    intercept whole. The bits above BitsStored are written as zeros, which PS3.5 8.1.1 allows,
    so a decoder must sign-extend from the HighBit itself.
    """
    out_dir.mkdir(parents=True, exist_ok=True)

    def change(ds: Dataset, stored: np.ndarray) -> np.ndarray:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != int(intercept):
            raise ValueError("to_signed needs slope 1 and a whole intercept")
        hu = stored.astype(np.int64) + int(intercept)
        if hu.min() < -(2 ** (bits - 1)) or hu.max() >= 2 ** (bits - 1):
            raise ValueError(f"HU {hu.min()}..{hu.max()} do not fit {bits} signed bits")
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 1
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
            if keyword in ds:
                delattr(ds, keyword)
        masked: np.ndarray = (hu & (2**bits - 1)).astype(np.uint16)
        return masked

    paths = [out_dir / Path(f).name for f in src_files]
    for src, dst in zip(src_files, paths, strict=True):
        _rewrite(Path(src), dst, change)
    return paths


def native_hu(path: Path) -> np.ndarray:
    """HU of every frame of a native little-endian file, without pydicom's pixel decoders.

    The independent reference: raw bytes, BitsStored applied by hand, PS3.3 C.11.1.1.2 rescale.
    Returns float32 (frames, rows, cols).
    """
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError(f"{path.name}: expected a native little-endian file")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    allocated, stored_bits = int(ds.BitsAllocated), int(ds.BitsStored)
    raw = np.frombuffer(ds.PixelData, dtype=f"<u{allocated // 8}")[: frames * rows * cols]
    values = raw.astype(np.int64) & ((1 << stored_bits) - 1)
    if int(ds.PixelRepresentation) == 1:
        sign = 1 << (stored_bits - 1)
        values = (values ^ sign) - sign
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = (values.astype(np.float64) * slope + intercept).astype(np.float32)
    return hu.reshape(frames, rows, cols)


def rescale_of(path: Path) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a file (identity where absent)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def with_unknown_codec(src: Path, syntax: str, dst: Path) -> Path:
    """A copy of a native file that claims `syntax` for its (unencoded, encapsulated) bytes.

    No codec is needed: the decoder must refuse the syntax before reading the bytes.
    """
    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    # pydicom's save_as refuses a syntax it does not know; write the parts ourselves, the data
    # set in Explicit VR Little Endian, the encoding of every encapsulated syntax (PS3.5 A.4).
    with dst.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")  # PS3.10 7.1: preamble and prefix
        fp = DicomFileLike(f)
        write_file_meta_info(fp, ds.file_meta)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
    return dst


def multiframe(src_files: Sequence[Path], dst: Path) -> Path:
    """One native multi-frame instance holding the frames of a single-frame series, in order."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(f) for f in src_files]
    ds = datasets[0]
    ds.NumberOfFrames = len(datasets)
    ds.PixelData = b"".join(bytes(d.PixelData) for d in datasets)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return dst


def copy_series(src_files: Sequence[Path], out_dir: Path) -> list[Path]:
    """Plain copies of a series' files (for tests that change them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, out_dir / Path(f).name)) for f in src_files]
