"""Run David Clunie's PixelMed validators on an SR or a SEG and fail the test on any error.

`assert_sr_valid` runs `DicomSRValidator -checktemplateid -checkcontentitemorder` (the IOD and
the TID 1500 content tree against PixelMed's template tables); `assert_seg_valid` runs
`DicomInstanceValidator` (the IOD, modules and conditions). They complement dciodvfy, whose
module rules and condition checks differ. PixelMed is the Debian/Ubuntu package
libpixelmed-java (a jar under /usr/share/java, run with any Java 11 or newer); without it
the test is skipped, or fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.ci import unavailable

_TIMEOUT_S = 300
_DEFAULT_JAR = Path("/usr/share/java/pixelmed.jar")

# JDK 17 caps XPath expressions (JDK-8270504); PixelMed's compiled SR and IOD rules exceed the
# caps and would stop with "XPath expression exceeds limit" without these.
_JVM_OPTIONS = (
    "-Djava.awt.headless=true",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)

# Warnings that PixelMed's template tables (PS3.16 of 2022) raise on content that the current
# PS3.16 defines; every other SR warning fails the test, as it names something of ours.
# - TID 1411 rows that later editions added: Finding Category, and the TID 4019 Algorithm
#   Identification items (Algorithm Name, Version, Manufacturer, Family).
# - The report's research-use disclaimer: a TEXT (121106, DCM, "Comment") under the TID 1500
#   root, allowed as TID 1500 is extensible, and not a row of the template.
_KNOWN_SR_WARNINGS = (
    '(276214006,SCT,"Finding category"): Content Item not in template',
    '(111001,DCM,"Algorithm Name"): Content Item not in template',
    '(111003,DCM,"Algorithm Version"): Content Item not in template',
    '(122405,DCM,"Algorithm Manufacturer"): Content Item not in template',
    '(111000,DCM,"Algorithm Family"): Content Item not in template',
    '(126000,DCM,"Imaging Measurement Report")/TEXT (121106,DCM,"Comment"): '
    "Content Item not in template",
)


def assert_sr_valid(path: Path) -> None:
    """Fail unless DicomSRValidator finds no error and only the known warnings in `path`."""
    lines = _validate(
        "com.pixelmed.validate.DicomSRValidator",
        ["-checktemplateid", "-checkcontentitemorder"],
        path,
    )
    if not any(line.startswith("Found Root Template TID_1500") for line in lines):
        pytest.fail(f"PixelMed {path.name}: TID 1500 not recognised\n" + "\n".join(lines))
    _fail_on(path, lines, known_warnings=_KNOWN_SR_WARNINGS)


def assert_seg_valid(path: Path) -> None:
    """Fail unless DicomInstanceValidator finds no error or warning in `path`."""
    lines = _validate("com.pixelmed.validate.DicomInstanceValidator", [], path)
    if "Found Segmentation IOD" not in lines:
        pytest.fail(f"PixelMed {path.name}: not validated as a SEG\n" + "\n".join(lines))
    _fail_on(path, lines, known_warnings=())


def assert_pixelmed_valid(path: Path) -> None:
    """`assert_sr_valid` or `assert_seg_valid`, as the Modality of `path` says."""
    modality = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).Modality
    if modality == "SR":
        assert_sr_valid(path)
    elif modality == "SEG":
        assert_seg_valid(path)
    else:
        pytest.fail(f"{path.name}: Modality {modality!r} is neither SR nor SEG", pytrace=False)


def _validate(main_class: str, options: list[str], path: Path) -> list[str]:
    java = shutil.which("java")
    jar = Path(os.environ.get("PIXELMED_JAR", _DEFAULT_JAR))
    if java is None or not jar.is_file():
        unavailable(
            f"PixelMed not found (java: {java}, {jar}): "
            "install libpixelmed-java (apt-get install libpixelmed-java)"
        )
    # Each validator takes one file per run (PixelMed 20220618).
    result = subprocess.run(
        [java, *_JVM_OPTIONS, "-cp", str(jar), main_class, *options, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT_S,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    # PixelMed prints a stack trace and exits 0 when it cannot read or transform a file; the
    # closing line shows that the rules ran to their end.
    if result.returncode != 0 or "IOD validation complete" not in lines:
        pytest.fail(
            f"PixelMed {path.name}: exit {result.returncode}, validation did not complete\n"
            + "\n".join(lines),
            pytrace=False,
        )
    return lines


def _fail_on(path: Path, lines: list[str], *, known_warnings: tuple[str, ...]) -> None:
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    unknown = [w for w in warnings if not any(w.endswith(known) for known in known_warnings)]
    if errors or unknown:
        pytest.fail(
            f"PixelMed {path.name}: {len(errors)} error(s), {len(unknown)} new warning(s)\n"
            + "\n".join(errors + unknown),
            pytrace=False,
        )
