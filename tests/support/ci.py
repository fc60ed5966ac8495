"""What a test does when something it needs is missing: skip here, fail in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(message: str) -> NoReturn:
    """Skip locally, fail in CI: CI must exercise every backend and encoder for real."""
    if IN_CI:
        pytest.fail(message + " (CI=true: not skipping)")
    pytest.skip(message)
