"""ct-tissue: volumes on a phantom of known anatomy, plausibility on a real CT, its primitives."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from pydicom.uid import UID

from agent.domain import Code
from agent.inference.registry import BUILTIN, get_model
from agent.inference.runner import run_model
from agent.inference.volume import Volume
from agent.models.package import package_identity, read_package_manifest, sha256_file
from tests.support.data import dicom_files, shared_data
from tests.support.phantom import (
    PhantomTruth,
    phantom_hu,
    phantom_labels,
    truth_volumes_ml,
    write_phantom_series,
)
from tests.support.volumes import load_files

CPU = torch.device("cpu")
PACKAGE = BUILTIN / "ct-tissue"


def _module(path: Path) -> ModuleType:
    """The package's code as a module of its own, for its primitives."""
    spec = importlib.util.spec_from_file_location("ct_tissue_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ct_tissue = _module(PACKAGE / "ct_tissue.py")
MODEL = get_model("ct-tissue")
IDENTITY = MODEL.identity
SEGMENTS = MODEL.segments


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomTruth, Volume]:
    truth = write_phantom_series(tmp_path_factory.mktemp("phantom"))
    return truth, load_files(truth.files)


@pytest.fixture(scope="module")
def real_ct() -> Volume:
    files = dicom_files(shared_data("ct-siemens-j2k"))
    return load_files(files)


def test_identity_and_segments_are_as_published() -> None:
    assert IDENTITY.name == "ct-tissue"
    assert IDENTITY.version == "1.0.0"
    assert IDENTITY.manufacturer == "pacs-agent"
    assert IDENTITY.device_uid.startswith("2.25.")
    assert UID(IDENTITY.device_uid).is_valid
    # The Device UID names the algorithm's code: it changes when the code does.
    digest = sha256_file(PACKAGE / "ct_tissue.py")
    manifest = read_package_manifest(PACKAGE)
    assert IDENTITY.device_uid == package_identity(manifest, (digest, digest)).device_uid
    assert IDENTITY.intended_use == "research use, not for diagnosis"
    assert all(s.color_lab is not None for s in SEGMENTS)
    assert all(s.measurements == ("volume", "mean") for s in SEGMENTS)
    anatomy = Code("91723000", "SCT", "Anatomical Structure")
    tissue = Code("85756007", "SCT", "Tissue")
    assert [(s.number, s.category, s.type.value, s.tracking_id) for s in SEGMENTS] == [
        (1, anatomy, "38266002", "ct-tissue body"),
        (2, anatomy, "39607008", "ct-tissue lungs"),
        (3, tissue, "3138006", "ct-tissue bone"),
        (4, tissue, "55603005", "ct-tissue adipose tissue"),
        (5, tissue, "87784001", "ct-tissue soft tissue"),
    ]


def test_phantom_volumes_match_the_truth(phantom: tuple[PhantomTruth, Volume]) -> None:
    truth, volume = phantom
    masks, measurements = run_model(MODEL, volume, CPU)
    assert masks.shape == (5, *volume.hu.shape)
    for spec, measured in zip(SEGMENTS, measurements, strict=True):
        expected = truth.volumes_ml[spec.label]
        assert measured.volume_ml == pytest.approx(expected, rel=0.005), spec.label
    # The gas bubble (about 4 ml) is enclosed air but too small to be lung.
    mean_hu = {s.label: m.mean_hu for s, m in zip(SEGMENTS, measurements, strict=True)}
    assert mean_hu["Lungs"] == pytest.approx(-850.0, abs=5.0)
    assert mean_hu["Bone"] == pytest.approx(700.0, abs=5.0)
    assert mean_hu["Adipose tissue"] == pytest.approx(-100.0, abs=5.0)
    assert mean_hu["Soft tissue"] == pytest.approx(40.0, abs=5.0)


def test_tissues_are_exclusive_and_inside_the_body(phantom: tuple[PhantomTruth, Volume]) -> None:
    _, volume = phantom
    masks = MODEL.predict(volume, CPU)
    assert masks.dtype == np.bool_
    assert int(masks[1:].sum(axis=0, dtype=np.uint8).max()) == 1
    assert not (masks[1:].any(axis=0) & ~masks[0]).any()


def test_real_ct_is_plausible(real_ct: Volume) -> None:
    # 40 mm of upper abdomen, liver dome to stomach, arms beside the trunk. Lungs reach only
    # a sliver of the right base into the top slice (under 1 ml); the two pockets of stomach
    # and colon gas (13 and 17 ml) are not lung.
    _, measurements = run_model(MODEL, real_ct, CPU)
    ml = {s.label: m.volume_ml for s, m in zip(SEGMENTS, measurements, strict=True)}
    mean_hu = {s.label: m.mean_hu for s, m in zip(SEGMENTS, measurements, strict=True)}
    slab_cm = real_ct.hu.shape[0] * real_ct.spacing[0] / 10.0
    area_cm2 = ml["Body"] / slab_cm
    assert 500.0 < area_cm2 < 1200.0  # a trunk with arms, not the table or the whole field
    assert ml["Lungs"] < 5.0
    assert ml["Bone"] > 50.0  # vertebra, ribs, both humeri
    assert mean_hu["Bone"] > 300.0
    assert ml["Adipose tissue"] > 200.0
    assert -120.0 < mean_hu["Adipose tissue"] < -60.0
    assert ml["Soft tissue"] > 1000.0  # liver, spleen, muscle
    assert 20.0 < mean_hu["Soft tissue"] < 90.0
    parts = sum(ml[s.label] for s in SEGMENTS[1:])
    # What is left is gas, partial-volume rims and 150..200 HU (contrast-enhanced vessels).
    assert 0.8 * ml["Body"] < parts <= ml["Body"]


def test_empty_and_tiny_volumes_give_empty_masks() -> None:
    air = Volume(
        hu=np.full((3, 8, 8), -1000.0, dtype=np.float32),
        spacing=(1.0, 1.0, 1.0),
    )
    masks = MODEL.predict(air, CPU)
    assert masks.shape == (5, 3, 8, 8)
    assert not masks.any()
    one_slice = Volume(
        hu=np.full((1, 4, 4), 40.0, dtype=np.float32),
        spacing=(1.0, 1.0, 1.0),
    )
    masks = MODEL.predict(one_slice, CPU)
    assert masks[0].all() and masks[4].all()


def test_body_excludes_table_and_thin_blanket() -> None:
    labels = phantom_labels(8, 96, 96, 4.5, 5.0)
    hu = phantom_hu(labels)
    hu[:, 90, :] = 300.0  # the table: a 4.5 mm shell below the patient
    hu[:, 4, :] = 40.0  # a blanket fold: one row, above the patient
    hu[:, 4:40, 48] = 40.0  # ... that touches the skin through a thin strand
    volume = Volume(hu=hu, spacing=(5.0, 4.5, 4.5))
    masks = MODEL.predict(volume, CPU)
    expected = truth_volumes_ml(labels, 1.0)["Body"]  # in voxels
    assert int(masks[0].sum()) == pytest.approx(expected, rel=0.01)
    assert not masks[0][:, 90, :].any()
    assert not masks[0][:, 4, :].any()


@pytest.mark.parametrize("seed", range(5))
def test_components_and_holes_agree_with_scipy(seed: int) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(2, 24, size=3))
    mask = rng.random(shape) < rng.uniform(0.3, 0.7)
    tensor = torch.from_numpy(mask)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    components = ct_tissue._components(tensor, axes=(0, 1))
    assert sorted(components.sizes.tolist()) == sorted(sizes.tolist())
    largest = ct_tissue._keep_components(tensor, 0.0, min_fraction_of_largest=1.0)
    assert int(largest.sum()) == (int(sizes.max()) if count else 0)
    filled = ct_tissue._fill_holes_2d(tensor).numpy()
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    np.testing.assert_array_equal(filled, expected)
    dilated = ct_tissue._dilate_inplane(tensor, 2).numpy()
    square = np.ones((1, 5, 5), dtype=bool)
    np.testing.assert_array_equal(dilated, ndimage.binary_dilation(mask, square))
    eroded = ct_tissue._erode_inplane(tensor, 1).numpy()
    np.testing.assert_array_equal(
        eroded, ndimage.binary_erosion(mask, np.ones((1, 3, 3), dtype=bool), border_value=1)
    )


def test_small_holes_only() -> None:
    mask = torch.zeros((1, 30, 30), dtype=torch.bool)
    mask[0, 2:12, 2:12] = True
    mask[0, 4:6, 4:6] = False  # a 4-voxel hole
    mask[0, 15:29, 15:29] = True
    mask[0, 17:27, 17:27] = False  # a 100-voxel hole
    filled = ct_tissue._fill_holes_2d(mask, max_hole_voxels=10)
    assert bool(filled[0, 4:6, 4:6].all())
    assert not bool(filled[0, 17:27, 17:27].any())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result(phantom: tuple[PhantomTruth, Volume]) -> None:
    _, volume = phantom
    model = MODEL
    np.testing.assert_array_equal(
        model.predict(volume, torch.device("cuda")), model.predict(volume, CPU)
    )


@pytest.mark.skipif(
    os.environ.get("PACS_AGENT_BENCH") != "1", reason="benchmark; set PACS_AGENT_BENCH=1"
)
@pytest.mark.parametrize("anatomy", ["phantom", "real"])
def test_speed_on_a_full_size_ct(anatomy: str) -> None:
    if anatomy == "phantom":
        hu = phantom_hu(phantom_labels(300, 512, 512, 0.75, 1.0))
        spacing = (1.0, 0.75, 0.75)
    else:
        # The real CT's 20 slices, mirrored back and forth to 300 (no seams along z).
        files = dicom_files(shared_data("ct-siemens-j2k"))
        real = load_files(files)
        order = np.concatenate([np.arange(20)[:: 1 if k % 2 == 0 else -1] for k in range(15)])
        hu, spacing = np.ascontiguousarray(real.hu[order]), real.spacing
    volume = Volume(hu=hu, spacing=spacing)
    model = MODEL
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        model.predict(volume, CPU)
        timings.append(round(time.perf_counter() - start, 2))
    threads = torch.get_num_threads()
    print(f"\nct-tissue {anatomy} {hu.shape} on {threads} CPU threads: {timings} s")
    assert min(timings) < 20.0


def test_phantom_volume_is_in_slice_order(phantom: tuple[PhantomTruth, Volume]) -> None:
    truth, volume = phantom
    assert tuple(r.path for r in volume.frames) == truth.files


def test_the_runner_gives_what_the_algorithm_gives(phantom: tuple[PhantomTruth, Volume]) -> None:
    # ct-tissue runs through the package runner (whole-volume mode, bool masks, spacing
    # passed); that must be exactly the algorithm's own answer on the same voxels.
    _, volume = phantom
    direct = ct_tissue.segment(torch.from_numpy(volume.hu.copy()), volume.spacing).numpy()
    assert np.array_equal(MODEL.predict(volume, CPU), direct)


def test_a_sagittal_stack_is_turned_before_the_algorithm(
    phantom: tuple[PhantomTruth, Volume],
) -> None:
    # The same phantom stored as sagittal slices: ct-tissue works slice by slice in-plane,
    # so it must be given axial planes; the masks come back on the sagittal grid.
    _, volume = phantom
    sagittal_hu = np.ascontiguousarray(volume.hu.transpose(2, 0, 1)[:, ::-1, :])
    z, y, x = volume.spacing
    sagittal = Volume(
        hu=sagittal_hu,
        spacing=(x, z, y),
        # Rows run towards the back (+y), columns towards the feet (-z), slices left (+x).
        axes=((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
    )
    axial_masks = MODEL.predict(volume, CPU)
    sagittal_masks = MODEL.predict(sagittal, CPU)
    assert np.array_equal(sagittal_masks, axial_masks.transpose(0, 3, 1, 2)[:, :, ::-1, :])
