"""Decode pixel frames into Hounsfield units, for any transfer syntax with an installed decoder.

Each frame is decoded with the plugin named here for its syntax and rescaled by the Modality LUT
of its item. decode_frames decodes a few frames in the calling process and hands more to the
worker-process pool of decode_pool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
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

from agent.dicom.files import DICOM_ERRORS, read_dicom
from agent.dicom.uids import JPEG_XL_SYNTAXES, is_valid_uid
from agent.errors import PermanentError
from agent.logs import instance_key, without_file_names

# Fewer items than this are decoded in the calling process: starting work in the pool costs
# more than it saves.
SERIAL_BELOW = 16

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
        **JPEG_XL_SYNTAXES,
        "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
    }
)


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
    if not is_valid_uid(uid):
        return f"an invalid transfer syntax UID {uid[:64]!r}"
    name = _NAMES_PYDICOM_LACKS.get(uid) or UID(uid).name
    if name == uid:
        return f"transfer syntax {uid}"
    return f"{name} ({uid})"


def decoder_for(transfer_syntax: str) -> str | None:
    """The pydicom decoding plugin used for `transfer_syntax`, or None if none is installed.

    The first installed plugin of our preference for the syntax; decode_frames hands this name
    to pydicom. Native (uncompressed or deflated) syntaxes are decoded by pydicom itself:
    "pydicom".
    """
    uid = transfer_syntax.strip()
    if not is_valid_uid(uid):
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


def stored_frame(item: DecodeItem) -> np.ndarray:
    """The stored values of one frame, as pydicom decodes them; PermanentError if it cannot."""
    name = instance_key(item.path)  # the file's name is its SOP Instance UID
    try:
        syntax = str(read_file_meta_info(item.path).get("TransferSyntaxUID", "") or "")
    except DICOM_ERRORS as exc:
        raise PermanentError(f"cannot read {name}: {type(exc).__name__}") from exc
    plugin = decoder_for(syntax)
    if plugin is None:
        raise PermanentError(no_decoder_reason(syntax))
    header = Dataset()
    try:
        # pixel_array returns stored values: no Modality or VOI LUT, and with raw=True no
        # colour-space conversion (grayscale is all we accept). Rescaling is ours.
        if syntax == DeflatedExplicitVRLittleEndian:
            # pixel_array(path) does not inflate a deflated dataset (PS3.5 A.5); read_dicom
            # does, bounded: a deflate bomb is refused, not inflated whole.
            header = read_dicom(item.path, pixels=True)
            stored = pixel_array(header, index=item.index, raw=True)
        else:
            # From a path, pixel_array reads only the requested frame.
            stored = pixel_array(
                item.path, ds_out=header, index=item.index, decoding_plugin=plugin, raw=True
            )
    except DICOM_ERRORS as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        detail = without_file_names(detail, item.path)
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


def checked_frame(item: DecodeItem, shape: tuple[int, int] | None) -> np.ndarray:
    """The stored values of one frame, checked to be grayscale and, if given, of `shape`."""
    stored = stored_frame(item)
    if stored.ndim != 2:
        samples = stored.shape[-1] if stored.ndim == 3 else "?"
        raise PermanentError(
            f"{instance_key(item.path)} frame {item.index} is not grayscale "
            f"(SamplesPerPixel {samples}); only single-sample images can be loaded"
        )
    if shape is not None and stored.shape != shape:
        raise PermanentError(
            f"frames differ in size: {instance_key(item.path)} frame {item.index} is "
            f"{stored.shape[0]}x{stored.shape[1]}, the first frame is {shape[0]}x{shape[1]}"
        )
    return stored


def rescale_into(
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


def decode_serial(items: Sequence[DecodeItem]) -> np.ndarray:
    """Decode and rescale `items` one after another in the calling process."""
    first = checked_frame(items[0], None)
    shape = (int(first.shape[0]), int(first.shape[1]))
    out = np.empty((len(items), *shape), dtype=np.float32)
    scratch = np.empty(shape, dtype=np.float64)
    rescale_into(first, items[0], out[0], scratch)
    for i, item in enumerate(items[1:], start=1):
        rescale_into(checked_frame(item, shape), item, out[i], scratch)
    return out


def decode_frames(items: Sequence[DecodeItem], *, workers: int | None = None) -> np.ndarray:
    """Decode and rescale `items` into a float32 (len(items), rows, cols) array in item order.

    Frames are stored values x slope + intercept (PS3.3 C.11.1.1.2), computed in float64. Uses
    `workers` processes (default: every CPU this process may use) for 16 items or more, the
    calling process otherwise. PermanentError if a frame cannot be decoded (no decoder for its
    transfer syntax, a damaged file), is not grayscale, or differs in size from the first.
    """
    # Imported here, not at the top: decode_pool imports this module's single-frame decoding,
    # and a spawned worker imports decode_pool first.
    from agent.inference.decode_pool import decode_parallel, worker_count

    if not items:
        raise PermanentError("no frames to decode")
    count = worker_count(workers)
    if count == 1 or len(items) < SERIAL_BELOW:
        return decode_serial(items)
    return decode_parallel(items, count)
