"""Locate the shared third-party DICOM test data beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Return a path under ../shared/data, or skip the test with a clear message if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (expected ../shared/data beside repo)")
    return path


def dicom_files(folder: Path) -> list[Path]:
    """The .dcm files directly in `folder`, sorted by name."""
    return sorted(folder.glob("*.dcm"))
