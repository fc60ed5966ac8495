"""Write example model packages of the small U-Net: TorchScript, torch.export and Python."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tests.models.unet import UNet3d

PATCH = (16, 16, 16)
CLASSES = 3  # background and two labels


def unet(seed: int = 0) -> UNet3d:
    """The example network with fixed random weights."""
    torch.manual_seed(seed)
    return UNet3d(in_channels=1, classes=CLASSES, width=4).eval()


def manifest_text(
    *,
    weights: str,
    extra_weights: str = "",
    outputs: str | None = None,
    extra: str = "",
) -> str:
    """A complete model.toml; `weights` is the [weights] table's body."""
    if outputs is None:
        outputs = """
[[outputs]]
index = 1
label = "Liver"
category = { value = "91723000", meaning = "Anatomical Structure" }
type = { value = "10200004", meaning = "Liver" }
color = [221, 130, 101]
measurements = ["volume", "mean"]

[[outputs]]
index = 2
label = "Spleen"
category = { value = "91723000", meaning = "Anatomical Structure" }
type = { value = "78961009", meaning = "Spleen" }
color = [157, 108, 162]
"""
    return f"""manifest_version = 1

[model]
name = "tiny-unet"
version = "0.1.0"
description = "A two-level 3D U-Net with random weights, for tests"
intended_use = "research use, not for diagnosis"

[weights]
{weights}
{extra_weights}

[input]
channels = 1

[preprocessing]
spacing_mm = [1.5, 1.5, 1.5]
clip = [-200.0, 300.0]
normalisation = "minmax"

[inference]
patch_size = [{PATCH[0]}, {PATCH[1]}, {PATCH[2]}]
overlap = 0.5
batch_size = 3
{extra}
{outputs}"""


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        # torch deprecates TorchScript for torch.export, but packages made with it exist and
        # are accepted: making one here is the point, not a use of a deprecated API by mistake.
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.jit\.(script|save)` is deprecated",
            category=DeprecationWarning,
        )
        torch.jit.save(torch.jit.script(model), str(path))


def write_torchscript(folder: Path, model: torch.nn.Module, **manifest: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_torchscript(model, folder / "model.pt")
    text = manifest_text(weights='format = "torchscript"\nfile = "model.pt"', **manifest)
    (folder / "model.toml").write_text(text)
    return folder


def save_exported(model: torch.nn.Module, path: Path, patch: tuple[int, int, int] = PATCH) -> None:
    example = torch.zeros(2, 1, *patch)
    # The sliding window's last batch may be smaller than batch_size: the batch is dynamic.
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def write_exported(folder: Path, model: torch.nn.Module, **manifest: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_exported(model, folder / "model.pt2")
    text = manifest_text(weights='format = "export"\nfile = "model.pt2"', **manifest)
    (folder / "model.toml").write_text(text)
    return folder


ENTRY_POINT = '''"""Custom code: builds the network and loads its state dict from the package."""
import torch

from tests.models.unet import UNet3d


def build(root):
    net = UNet3d(in_channels=1, classes=3, width=4)
    state = torch.load(root / "weights.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net
'''


def write_python(folder: Path, model: torch.nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "build_net.py").write_text(ENTRY_POINT)
    weights = 'format = "python"\nfile = "weights.pt"\nentry_point = "build_net:build"'
    (folder / "model.toml").write_text(manifest_text(weights=weights))
    return folder
