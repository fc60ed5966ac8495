"""Every code the encoders and the built-in model write is in the PS3.16 context group it is
used for, spelled as PS3.16 spells it (pydicom carries the PS3.16 tables)."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import Collection

from agent.dicom import codes
from agent.domain import Code
from agent.inference.registry import BUILTIN
from agent.models.package import read_package_manifest

# Segmentation Property Type per Segmentation Property Category (PS3.16 CID 7150 -> 7151).
_TYPES_OF_CATEGORY = {
    ("91723000", "SCT"): 7192,  # Anatomical Structure Segmentation Property Type
    ("85756007", "SCT"): 7191,  # Tissue Segmentation Property Type
}


def _members(cid: int) -> dict[tuple[str, str], str]:
    """(value, scheme) -> meaning of the concepts of PS3.16 CID `cid`."""
    return {
        (code.value, code.scheme_designator): code.meaning
        for code in Collection(f"CID{cid}").concepts.values()
    }


def _assert_in(code: Code, cid: int) -> None:
    members = _members(cid)
    key = (code.value, code.scheme)
    assert key in members, f"{code} is not in CID {cid}"
    assert code.meaning == members[key], f"{code}: PS3.16 says {members[key]!r}"


@pytest.mark.parametrize(
    ("code", "cid"),
    [
        (codes.ARTIFICIAL_INTELLIGENCE, 7162),  # Surface Processing Algorithm Family
        (codes.VOLUME, 7469),  # Generic Intensity and Size Measurement
        (codes.ATTENUATION_COEFFICIENT, 7469),
        (codes.MEAN, 7464),  # General Region of Interest Measurement Modifier
        (codes.CUBIC_CENTIMETER, 7181),  # Abstract Multi-dimensional Image Model Component Unit
        (codes.HOUNSFIELD_UNIT, 7181),
        (codes.ANATOMICAL_STRUCTURE, 7150),  # Segmentation Property Category
        (codes.TISSUE, 7150),
        *((procedure, 100) for procedure in codes.PROCEDURES.values()),
        (codes.IMAGING_PROCEDURE, 100),  # Quantitative Diagnostic Imaging Procedure
    ],
    ids=lambda value: value.meaning if isinstance(value, Code) else f"CID{value}",
)
def test_code_is_in_its_context_group(code: Code, cid: int) -> None:
    _assert_in(code, cid)


@pytest.mark.parametrize(
    ("code", "keyword"),
    [
        (codes.COMMENT, "Comment"),
        (codes.SOURCE_SERIES_FOR_SEGMENTATION, "SourceSeriesForSegmentation"),
    ],
)
def test_concept_name_is_spelled_as_ps3_16(code: Code, keyword: str) -> None:
    # Concept names of template rows rather than members of a context group.
    known = getattr(Collection(code.scheme), keyword)
    assert (code.value, code.meaning) == (known.value, known.meaning)


@pytest.mark.parametrize(
    ("modality", "value"),
    [
        ("CT", "25045-6"),
        ("MR", "25056-3"),
        ("PT", "44136-0"),
        ("NM", "49118-3"),
        ("DX", "43468-8"),
        ("CR", "43468-8"),
        ("US", "363679005"),
        ("", "363679005"),
    ],
)
def test_procedure_reported_follows_the_source_modality(modality: str, value: str) -> None:
    assert codes.procedure_reported(modality).value == value


def test_builtin_model_codes_are_in_the_segmentation_context_groups() -> None:
    for package in sorted(p for p in BUILTIN.iterdir() if (p / "model.toml").is_file()):
        for spec in read_package_manifest(package).segments():
            _assert_in(spec.category, 7150)
            _assert_in(spec.type, 7151)
            key = (spec.category.value, spec.category.scheme)
            assert key in _TYPES_OF_CATEGORY, f"{package.name} {spec.label}: no category CID"
            _assert_in(spec.type, _TYPES_OF_CATEGORY[key])
