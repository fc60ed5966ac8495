"""Run the viewer loaders of tests/viewers (dcmjs, Cornerstone3D, OHIF) on our SEG and SR.

Each loader is a small Node script that reads DICOM files and prints one line of JSON. They
need Node (Debian's nodejs) and the pinned packages of tests/viewers/package-lock.json
(`npm ci` there; .ci/run does it). Without them a test skips here and fails in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from tests.support.ci import IN_CI, unavailable

VIEWERS = Path(__file__).resolve().parent.parent / "viewers"
# One package per loader: all of them come from `npm ci` together.
_INSTALLED = (
    "dcmjs",
    "@cornerstonejs/adapters",
    "@ohif/extension-cornerstone-dicom-sr",
)
_TIMEOUT = 240.0  # seconds; a full CT's SEG on a 2-core CI machine takes a few


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node not found (Debian: apt-get install nodejs npm)"
    for package in _INSTALLED:
        if not (VIEWERS / "node_modules" / package / "package.json").is_file():
            return f"{package} is not installed: run `npm ci` in {VIEWERS}"
    return None


def installed() -> bool:
    """Whether the loaders can run here."""
    return _missing() is None


def wanted() -> bool:
    """Whether a test that checks viewers on the side should do so: always in CI."""
    return IN_CI or installed()


def run_loader(script: str, *args: Path | str) -> dict[str, Any]:
    """Run tests/viewers/`script` on `args`; its JSON output. Skips (fails in CI) without Node."""
    missing = _missing()
    if missing is not None:
        unavailable(f"viewer loaders: {missing}")
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, script, *(str(a) for a in args)],
        cwd=VIEWERS,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing:\n{done.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def cornerstone_labelmaps(
    seg: Path, sources: Sequence[Path], folder: Path
) -> tuple[dict[str, Any], np.ndarray]:
    """Cornerstone3D's labelmaps of `seg` over `sources` (in that order): (summary, array of
    labelmap x z x y x). Overlapping segments are spread over several labelmaps."""
    out = folder / "labelmaps.u16"
    summary = run_loader("cornerstone-seg.mjs", seg, out, *sources)
    shape = tuple(int(n) for n in summary["shape"])
    labelmaps = np.fromfile(out, dtype="<u2").reshape(shape)
    return summary, labelmaps


def assert_labelmaps_are_highdicoms(
    labelmaps: np.ndarray, seg_path: Path, sources: Sequence[Path]
) -> None:
    """Each segment of Cornerstone3D's labelmaps is highdicom's mask of it, voxel for voxel."""
    seg = hd.seg.segread(seg_path)
    numbers = seg.get_segment_numbers()
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )
    assert set(np.unique(labelmaps).tolist()) <= {0, *numbers}
    for index, number in enumerate(numbers):
        theirs = (labelmaps == number).any(axis=0)
        ours = masks[..., index].astype(bool)
        assert theirs.shape == ours.shape, number
        assert np.array_equal(theirs, ours), f"segment {number} differs"


def slice_order(sources: Sequence[Path]) -> list[Path]:
    """Single-frame images in ascending position along their normal, as the SEG's volume."""
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in sources}

    def along_normal(path: Path) -> float:
        ds = headers[path]
        row, column = (
            np.array(ds.ImageOrientationPatient[:3]),
            np.array(ds.ImageOrientationPatient[3:]),
        )
        return float(np.dot(np.cross(row, column), np.array(ds.ImagePositionPatient, float)))

    return sorted(sources, key=along_normal)


def assert_viewers_load(
    seg_path: Path, sr_path: Path, sources: Sequence[Path], folder: Path
) -> None:
    """dcmjs reads both; Cornerstone3D's labelmap of the SEG is highdicom's, voxel for voxel; OHIF
    loads the SR's display set with every measurement placed and labelled (Volume, and the mean
    for CT)."""
    ordered = slice_order(sources)
    for path in (seg_path, sr_path):
        assert run_loader("dcmjs-read.mjs", path)["sopInstanceUID"] == str(
            pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        )
    _, labelmaps = cornerstone_labelmaps(seg_path, ordered, folder)
    assert_labelmaps_are_highdicoms(labelmaps, seg_path, ordered)
    result = run_loader("ohif-sr.cjs", sr_path, *ordered)
    assert result["displaySets"] == 1 and result["loadError"] is None, result.get("loadError")
    assert result["measurements"], "OHIF found no measurement"
    ct = pydicom.dcmread(ordered[0], stop_before_pixels=True).Modality == "CT"
    for measurement in result["measurements"]:
        names = {label["label"] for label in measurement["labels"]}
        wanted = {"Volume", "Attenuation Coefficient"} if ct else {"Volume"}
        assert wanted <= names, (measurement["trackingIdentifier"], names)
        assert measurement["loaded"], measurement["trackingIdentifier"]
