"""Fast generator of a realistic-size synthetic CT series (uncompressed) for benchmarks.

One template dataset is built once; each slice only changes its UIDs, position and pixel data.
Pixels are int16 stored values (HU + 1024) of a simple body: an elliptic trunk of soft tissue
with two lungs and a vertebra whose sizes vary along the series, plus mild deterministic noise.

    python -m bench.ct_series OUT_DIR [--slices 300] [--rows 512] [--cols 512]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.phantom import ct_file_meta, ct_slice_header

RESCALE_INTERCEPT = -1024
PIXEL_SPACING_MM = 0.75
SLICE_THICKNESS_MM = 1.0


def _template(rows: int, cols: int, study_uid: str, series_uid: str) -> Dataset:
    """The dataset shared by all slices (the tests' CT header); per-slice attributes come later."""
    ds = ct_slice_header(study_uid, series_uid, generate_uid(), "", series_number=1)
    ds.file_meta = ct_file_meta("1.2", ExplicitVRLittleEndian)
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH-CT"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.PixelRepresentation = 1  # signed: noise can take air below stored value 0
    return ds


class _Phantom:
    """Precomputed normalised coordinates; `slice(z)` draws one axial slice in stored values."""

    def __init__(self, rows: int, cols: int) -> None:
        y, x = np.ogrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
        self.trunk = (x / 0.85) ** 2 + (y / 0.6) ** 2
        self.lung_left = ((x + 0.38) / 0.28) ** 2 + ((y + 0.05) / 0.4) ** 2
        self.lung_right = ((x - 0.38) / 0.28) ** 2 + ((y + 0.05) / 0.4) ** 2
        self.spine = (x / 0.09) ** 2 + ((y - 0.4) / 0.09) ** 2
        rng = np.random.default_rng(1234)
        self.noise = rng.normal(0.0, 12.0, (rows, cols)).astype(np.int16)

    def slice(self, fraction: float) -> npt.NDArray[np.int16]:
        """Stored values for the slice at `fraction` (0..1) of the series length."""
        lung_scale = 0.6 + 0.4 * np.sin(np.pi * fraction)  # lungs widest mid-series
        hu = np.full(self.trunk.shape, -1000, dtype=np.int16)
        hu[self.trunk <= 1.0] = 40
        hu[self.lung_left <= lung_scale] = -850
        hu[self.lung_right <= lung_scale] = -850
        hu[self.spine <= 1.0] = 700
        hu += self.noise
        stored = hu - RESCALE_INTERCEPT
        return np.roll(stored, int(fraction * 7), axis=1).astype(np.int16)


def write_ct_series(
    folder: Path,
    slices: int = 300,
    rows: int = 512,
    cols: int = 512,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write a synthetic CT series as Explicit VR Little Endian files; return their paths in order.

    Files are named `CT0001.dcm`, ... in `folder` (created if needed). New study/series UIDs are
    generated unless given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _template(rows, cols, study_uid or generate_uid(), series_uid or generate_uid())
    phantom = _Phantom(rows, cols)
    paths: list[Path] = []
    for index in range(slices):
        z = -index * SLICE_THICKNESS_MM
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [
            -PIXEL_SPACING_MM * (cols - 1) / 2,
            -PIXEL_SPACING_MM * (rows - 1) / 2,
            z,
        ]
        ds.SliceLocation = z
        ds.PixelData = phantom.slice(index / max(slices - 1, 1)).tobytes()
        path = folder / f"CT{index + 1:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: write a series and print the folder and file count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    args = parser.parse_args(argv)
    paths = write_ct_series(args.folder, args.slices, args.rows, args.cols)
    print(f"{len(paths)} files in {args.folder}")


if __name__ == "__main__":
    main()
