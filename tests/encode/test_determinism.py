"""Same inputs give byte-identical SEG and SR; a new model version or input gives new instances."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset

from tests.encode import (
    SYNTHETIC_SIZE,
    build_and_save,
    encode,
    model,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.data import REPO_ROOT


def test_building_twice_gives_identical_bytes(tmp_path: Path) -> None:
    first_seg, first_sr = build_and_save(tmp_path / "first")
    second_seg, second_sr = build_and_save(tmp_path / "second")
    assert first_seg.read_bytes() == second_seg.read_bytes()
    assert first_sr.read_bytes() == second_sr.read_bytes()


def test_bytes_do_not_depend_on_process_or_hash_seed(tmp_path: Path) -> None:
    # Set and dict ordering of strings varies with PYTHONHASHSEED between processes; a repeat
    # after a restart must still send the same bytes.
    outputs = []
    for seed in ("1", "2"):
        folder = tmp_path / f"seed-{seed}"
        script = "import sys, pathlib; from tests.encode import build_and_save; "
        script += "build_and_save(pathlib.Path(sys.argv[1]))"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", script, str(folder)],
            cwd=REPO_ROOT,
            env=env,
            check=True,
            timeout=120,
        )
        outputs.append(((folder / "seg.dcm").read_bytes(), (folder / "sr.dcm").read_bytes()))
    assert outputs[0] == outputs[1]
    in_process = build_and_save(tmp_path / "here")
    assert outputs[0] == (in_process[0].read_bytes(), in_process[1].read_bytes())


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_headers(write_synthetic_ct(tmp_path_factory.mktemp("det") / "ct"))


def _build(
    headers: list[Dataset], version: str, slices: slice, instance_number: int = 1
) -> tuple[Dataset, Dataset]:
    chosen = headers[slices]
    masks = synthetic_masks(len(chosen), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    encoded = encode(chosen, masks, 0.001, identity=model(version), instance_number=instance_number)
    return encoded.seg, encoded.sr


def _minted(headers: list[Dataset], version: str, slices: slice) -> tuple[set[str], set[str]]:
    """The series UIDs, and every other UID the encoders mint (not copy), for one input."""
    seg, sr = _build(headers, version, slices)
    tracking = {d.TrackingUID for d in seg.SegmentSequence}
    series = {seg.SeriesInstanceUID, sr.SeriesInstanceUID}
    instances = {
        seg.SOPInstanceUID,
        sr.SOPInstanceUID,
        seg.DimensionOrganizationSequence[0].DimensionOrganizationUID,
        *tracking,
    }
    return series, instances


def test_new_model_version_gives_new_instances_in_the_same_series(
    headers: list[Dataset],
) -> None:
    old_series, old = _minted(headers, "1.0.0", slice(None))
    new_series, new = _minted(headers, "1.1.0", slice(None))
    assert old.isdisjoint(new)
    assert old_series == new_series
    assert (old_series, old) == _minted(headers, "1.0.0", slice(None))


def test_new_input_set_gives_new_instances_in_the_same_series(headers: list[Dataset]) -> None:
    full_series, full = _minted(headers, "1.0.0", slice(None))
    partial_series, partial = _minted(headers, "1.0.0", slice(1, None))
    assert full.isdisjoint(partial)
    assert full_series == partial_series


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_revision_sets_the_instance_number_and_nothing_else(headers: list[Dataset]) -> None:
    first = _build(headers, "1.0.0", slice(None), instance_number=1)
    second = _build(headers, "1.0.0", slice(None), instance_number=2)
    for one, two in zip(first, second, strict=True):
        assert (one.InstanceNumber, two.InstanceNumber) == (1, 2)
        two.InstanceNumber = 1
        assert _bytes(one) == _bytes(two)
