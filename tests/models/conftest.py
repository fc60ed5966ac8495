"""The example U-Net written as each kind of package, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.packages import unet, write_exported, write_python, write_torchscript


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    model = unet()
    return {
        "torchscript": write_torchscript(root / "torchscript", model),
        "export": write_exported(root / "export", model),
        "python": write_python(root / "python", model),
    }
