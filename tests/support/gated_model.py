"""A model package whose network waits while a gate file exists: an inference that lasts exactly
as long as a test needs to kill, stop or starve the worker running it."""

from __future__ import annotations

from pathlib import Path

NAME = "gated"

_CODE = '''"""A network that waits while its gate file exists, then marks the bright voxels."""
import time
from pathlib import Path

import torch


class Gated(torch.nn.Module):
    def __init__(self, gate: Path) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = self.gate.with_name("started")
        started.write_text("")
        while self.gate.exists():
            time.sleep(0.05)
        scores = torch.zeros(x.shape[0], 2, *x.shape[2:])
        scores[:, 1] = (x[:, 0] > 0.5).float()
        return scores


def build(root: Path) -> Gated:
    return Gated(Path((root / "gate.txt").read_text().strip()))
'''

_MANIFEST = f'''manifest_version = 1

[model]
name = "{NAME}"
version = "1.0.0"
intended_use = "research use, not for diagnosis"

[weights]
format = "python"
file = "gate.txt"
entry_point = "gated_net:build"

[preprocessing]
clip = [-200.0, 300.0]
normalisation = "minmax"

[inference]
mode = "whole"

[[outputs]]
index = 1
label = "Bright"
category = {{ value = "91723000", meaning = "Anatomical Structure" }}
type = {{ value = "10200004", meaning = "Liver" }}
'''


class GatedModel:
    """The package folder, and its gate: closed (the network waits) until `open()`.

    `started` exists once the network has been called (since the last `close()`).
    """

    def __init__(self, folder: Path) -> None:
        self.package = folder / "package"
        self.package.mkdir(parents=True, exist_ok=True)
        self.gate = folder / "gate" / "closed"
        self.gate.parent.mkdir(parents=True, exist_ok=True)
        self.started = self.gate.with_name("started")
        (self.package / "gate.txt").write_text(str(self.gate) + "\n")
        (self.package / "gated_net.py").write_text(_CODE)
        (self.package / "model.toml").write_text(_MANIFEST)

    def close(self) -> None:
        self.started.unlink(missing_ok=True)
        self.gate.write_text("")

    def open(self) -> None:
        self.gate.unlink(missing_ok=True)

    def config(self) -> str:
        """The [[models]] table that configures it (on the CPU)."""
        return f'[[models]]\nname = "{NAME}"\npackage = "{self.package}"\ndevice = "cpu"\n'
