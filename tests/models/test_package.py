"""Model packages: export the example U-Net, load it back, identify it, and refuse bad packages."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from agent.dicom.uids import is_valid_uid
from agent.models.check import check_package
from agent.models.manifest import PackageError, parse_manifest
from agent.models.package import load_package, read_package_manifest
from tests.models.packages import (
    CLASSES,
    PATCH,
    manifest_text,
    unet,
    write_torchscript,
)


@pytest.mark.parametrize("kind", ["torchscript", "export", "python"])
def test_loaded_network_matches_the_eager_one(packages: dict[str, Path], kind: str) -> None:
    package = load_package(packages[kind])
    torch.manual_seed(1)
    patch = torch.randn(2, 1, *PATCH)
    with torch.inference_mode():
        expected = unet()(patch)
        got = package.network(patch)
    assert got.shape == (2, CLASSES, *PATCH)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["torchscript", "export", "python"])
def test_check_runs_once_on_a_synthetic_volume(packages: dict[str, Path], kind: str) -> None:
    result = check_package(load_package(packages[kind]))
    assert result.shape == tuple(p + p // 2 for p in PATCH)
    assert result.output_channels == CLASSES
    assert set(result.labels_found) <= {1, 2}
    assert result.seconds >= 0


def test_sha256_and_device_uid_are_stable(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = packages["torchscript"]
    first, second = load_package(folder), load_package(folder)
    assert first.weights_sha256 == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    assert first.identity == second.identity
    assert is_valid_uid(first.identity.device_uid)
    assert (first.identity.name, first.identity.version) == ("tiny-unet", "0.1.0")
    # The same folder copied elsewhere is the same network.
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert load_package(copy).identity.device_uid == first.identity.device_uid
    # Other weights are another network, whatever the manifest says.
    other = load_package(write_torchscript(tmp_path / "other", unet(seed=7)))
    assert other.identity.version == first.identity.version
    assert other.identity.device_uid != first.identity.device_uid


def test_segments_follow_the_outputs(packages: dict[str, Path]) -> None:
    manifest = read_package_manifest(packages["export"])
    segments = manifest.segments()
    assert [(s.number, s.label, s.type.value) for s in segments] == [
        (1, "Liver", "10200004"),
        (2, "Spleen", "78961009"),
    ]
    assert segments[0].category.scheme == "SCT"
    assert manifest.outputs[0].measurements == ("volume", "mean")
    assert manifest.outputs[1].measurements == ("volume",)
    lab = manifest.outputs[0].dicom_lab
    assert lab is not None and all(0 <= v <= 0xFFFF for v in lab)


def test_stated_sha256_is_checked(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(packages["torchscript"], tmp_path / "pkg")
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    good = manifest_text(
        weights='format = "torchscript"\nfile = "model.pt"', extra_weights=f'sha256 = "{digest}"'
    )
    (folder / "model.toml").write_text(good)
    assert load_package(folder).weights_sha256 == digest
    (folder / "model.toml").write_text(good.replace(digest, "0" * 64))
    with pytest.raises(PackageError, match=r"model\.pt has SHA-256 .* the manifest says 0+$"):
        load_package(folder)


def test_missing_weights_are_named(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(packages["torchscript"], tmp_path / "pkg")
    (folder / "model.pt").unlink()
    with pytest.raises(PackageError, match=r"weights file model\.pt is missing"):
        load_package(folder)


def test_damaged_weights_are_named(packages: dict[str, Path], tmp_path: Path) -> None:
    for kind, name in (("torchscript", "model.pt"), ("export", "model.pt2")):
        folder = shutil.copytree(packages[kind], tmp_path / kind)
        (folder / name).write_bytes(b"not a model")
        with pytest.raises(PackageError, match=rf"^{name}: not a "):
            load_package(folder)


SOURCE = "pkg/model.toml"
WEIGHTS = 'format = "torchscript"\nfile = "model.pt"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            manifest_text(weights=WEIGHTS).replace('version = "0.1.0"\n', ""),
            "invalid value for 'model.version': Field required",
        ),
        (
            manifest_text(weights=WEIGHTS, extra="stride = 2"),
            "unknown key 'inference.stride'",
        ),
        (
            manifest_text(weights=WEIGHTS).replace("index = 2", "index = 1"),
            "invalid value for 'outputs': Value error, output indices must be unique",
        ),
        (
            manifest_text(weights=WEIGHTS).replace("index = 1", "index = 0"),
            "invalid value for 'outputs.0.index'",
        ),
        (
            manifest_text(weights=WEIGHTS).replace(
                'measurements = ["volume", "mean"]', 'measurements = ["max"]'
            ),
            "invalid value for 'outputs.0.measurements.0'",
        ),
        (
            manifest_text(weights='format = "torchscript"\nfile = "../model.pt"'),
            "invalid value for 'weights.file'",
        ),
        (
            manifest_text(weights='format = "python"\nfile = "model.pt"'),
            "entry_point is given with format",
        ),
        ("manifest_version = 1\n[model\n", "not valid TOML"),
    ],
)
def test_manifest_errors_name_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(PackageError) as caught:
        parse_manifest(text, SOURCE)
    assert str(caught.value).startswith(f"{SOURCE}: ")
    assert message in str(caught.value)


def test_archives_load(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = packages["torchscript"]
    expected = load_package(folder).identity
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as archive:
        for file in folder.iterdir():
            archive.write(file, file.name)
    nested = tmp_path / "nested.tar.gz"
    with tarfile.open(nested, "w:gz") as archive:
        archive.add(folder, arcname="tiny-unet")
    for path in (flat, nested):
        package = load_package(path)
        assert package.identity == expected
        assert package.source == path
        assert check_package(package).output_channels == CLASSES


def test_archive_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../model.toml", "manifest_version = 1\n")
    with pytest.raises(PackageError, match="lies outside the package"):
        load_package(path)


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no model\.toml in this folder"):
        load_package(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(PackageError, match=r"not a folder, \.zip or \.tar archive"):
        load_package(junk)
    with pytest.raises(PackageError, match="no such file or folder"):
        load_package(tmp_path / "absent")


def test_python_entry_point_leaves_no_trace(packages: dict[str, Path]) -> None:
    path_before, modules_before = list(sys.path), set(sys.modules)
    package = load_package(packages["python"])
    assert sys.path == path_before
    assert not {m for m in set(sys.modules) - modules_before if "build_net" in m}
    assert not {m for m in set(sys.modules) - modules_before if m.startswith("_pacs_agent_model")}
    # The code is part of the network: its hash goes into the device UID too.
    assert package.identity.device_uid != load_package(packages["torchscript"]).identity.device_uid


def test_failing_entry_point_is_named(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(packages["python"], tmp_path / "pkg")
    (folder / "build_net.py").write_text("def build(root):\n    raise RuntimeError('no GPU')\n")
    with pytest.raises(PackageError, match=r"^build_net\.py: build failed: no GPU$"):
        load_package(folder)
    (folder / "build_net.py").write_text("x = 1\n")
    with pytest.raises(PackageError, match="has no function build"):
        load_package(folder)


def test_too_few_output_channels_fail_the_check(packages: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(packages["torchscript"], tmp_path / "pkg")
    text = (folder / "model.toml").read_text().replace("index = 2", "index = 3")
    (folder / "model.toml").write_text(text)
    with pytest.raises(PackageError, match="gives 3 output channels; outputs up to index 3 need 4"):
        check_package(load_package(folder))
