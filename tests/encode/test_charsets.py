"""Patient and study values reach SEG and SR unchanged: character sets, empty, long, private."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement

from agent.domain import SegmentSpec
from tests.encode import (
    DISCLAIMER,
    SEGMENTS,
    SYNTHETIC_SIZE,
    SYNTHETIC_SLICES,
    empty_segments_comment,
    encode,
    read_headers,
    synthetic_masks,
    write_synthetic_ct,
)
from tests.support.dciodvfy import assert_dciodvfy_clean
from tests.support.pixelmed import assert_pixelmed_valid

Value = str | bytes  # bytes: already encoded, written as they are

# The Patient and General Study values the encoders copy, compared after a round trip.
COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDescription",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@dataclass(frozen=True)
class Variant:
    """A change to the phantom CT headers and the Specific Character Set the outputs should get."""

    charset: str | list[str] | None  # None: the source has no Specific Character Set
    values: Mapping[str, Value]
    written: str | list[str] | None  # None: the outputs have none (default repertoire)
    removed: tuple[str, ...] = ()
    segments: Sequence[SegmentSpec] = field(default=SEGMENTS)


def _other_ids(issuer: Value) -> Dataset:
    """An Other Patient IDs Sequence item (PS3.3 C.7.1.1): a nested value to carry too."""
    item = Dataset()
    item.PatientID = "OTHER-1"
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


# PS3.5 Annex H (Japanese), I (Korean), K (Chinese) and pydicom's charset test files give the
# names; the ISO 2022 IR 58 values are the bytes of PS3.5 K.2, with their escape sequences.
VARIANTS = {
    "latin-1": Variant(
        "ISO_IR 100",
        {
            "PatientName": "Buc^Jérôme",
            "StudyDescription": "Étude abdominale",
            "ReferringPhysicianName": "Müller^Anne",
            "IssuerOfPatientID": "Hôpital Bicêtre",
        },
        "ISO_IR 100",
    ),
    "utf-8": Variant(
        "ISO_IR 192",
        {
            "PatientName": "Wang^XiaoDong=王^小東",
            "StudyDescription": "Ünïcode 山田 ✓ € Ωμέγα",
            "IssuerOfPatientID": "Krankenhaus Süd",
        },
        "ISO_IR 192",
    ),
    "japanese": Variant(
        ["", "ISO 2022 IR 87"],
        {
            "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "StudyDescription": "胸部ＣＴ 造影",
            "ReferringPhysicianName": "Sato^Hanako=佐藤^花子=さとう^はなこ",
            "IssuerOfPatientID": "東京病院",
        },
        ["", "ISO 2022 IR 87"],
    ),
    "korean": Variant(
        ["", "ISO 2022 IR 149"],
        {
            "PatientName": "Hong^Gildong=洪^吉洞=홍^길동",
            "StudyDescription": "흉부 CT",
            "IssuerOfPatientID": "서울병원",
        },
        ["", "ISO 2022 IR 149"],
    ),
    "chinese-gb2312": Variant(
        ["", "ISO 2022 IR 58"],
        {
            "PatientName": b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab=",
            "StudyDescription": b"\x1b$)A\xd0\xd8\xb2\xbf CT",
            "IssuerOfPatientID": b"\x1b$)A\xd0\xd8\xb2\xbf",
        },
        ["", "ISO 2022 IR 58"],
    ),
    "cyrillic": Variant(
        "ISO_IR 144",
        {
            "PatientName": "Иванов^Иван^Иванович",
            "StudyDescription": "Томография грудной клетки",
            "IssuerOfPatientID": "Больница № 1",
        },
        "ISO_IR 144",
    ),
    "greek": Variant(
        "ISO_IR 126",
        {
            "PatientName": "Διονυσιος^Νικος",
            "StudyDescription": "Αξονική τομογραφία",
            "IssuerOfPatientID": "Νοσοκομείο",
        },
        "ISO_IR 126",
    ),
    # A common defect: non-ASCII bytes and no Specific Character Set. pydicom reads them as
    # Latin-1; the outputs say UTF-8 and keep the text.
    "undeclared-latin-1": Variant(
        None,
        {
            "PatientName": b"Buc^J\xe9r\xf4me",
            "StudyDescription": b"\xc9tude",
            "IssuerOfPatientID": "X",
        },
        "ISO_IR 192",
    ),
    # Our own text (a segment label) outside the source's character set: UTF-8 for everything.
    "label-outside-source-set": Variant(
        "ISO_IR 144",
        {"PatientName": "Иванов^Иван", "IssuerOfPatientID": "Больница"},
        "ISO_IR 192",
        segments=(
            dataclasses.replace(SEGMENTS[0], label="Hüfte", tracking_id="hüfte links"),
            *SEGMENTS[1:],
        ),
    ),
    "plain-ascii-no-charset": Variant(
        None, {"PatientName": "DOE^JOHN", "IssuerOfPatientID": "HOSP"}, None
    ),
    "empty-type-2": Variant(
        "ISO_IR 100",
        {
            "PatientName": "",
            "PatientID": "",
            "PatientBirthDate": "",
            "PatientSex": "",
            "ReferringPhysicianName": "",
            "AccessionNumber": "",
            "StudyID": "",
            "StudyDate": "",
            "StudyTime": "",
            "IssuerOfPatientID": "",
        },
        "ISO_IR 100",
    ),
    "absent-type-2": Variant(
        "ISO_IR 100",
        {"IssuerOfPatientID": "X"},
        "ISO_IR 100",
        removed=(
            "PatientBirthDate",
            "PatientSex",
            "ReferringPhysicianName",
            "AccessionNumber",
            "StudyID",
        ),
    ),
    # PS3.5 6.2: LO holds 64 characters, a PN component group 64.
    "longest-values": Variant(
        "ISO_IR 100",
        {
            "PatientName": "^".join(["Ü" * 20, "é" * 20, "m" * 10, "p" * 5, "s" * 5]),
            "PatientID": "P" * 63 + "é",
            "StudyDescription": "Ä" + "x" * 62 + "ß",
            "IssuerOfPatientID": "I" * 64,
        },
        "ISO_IR 100",
    ),
    # Legal (PS3.5 6.2.1.2), and highdicom would quote it in a warning.
    "single-component-name": Variant(
        "ISO_IR 100", {"PatientName": "ANONYMOUS", "IssuerOfPatientID": "X"}, "ISO_IR 100"
    ),
}


@dataclass(frozen=True)
class Outputs:
    source: Path  # a source file, read back as the reference
    seg: Path
    sr: Path
    variant: Variant


@pytest.fixture(scope="module")
def base_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_ct(tmp_path_factory.mktemp("charset-ct"), slices=3)


def _private(ds: Dataset) -> None:
    """Private elements in a private block of the dataset (PS3.5 7.8.1)."""
    ds.add(DataElement(0x00090010, "LO", "PACS-AGENT TEST"))
    ds.add(DataElement(0x00091001, "LO", "private value"))


def _write_variant(base: list[Path], folder: Path, variant: Variant) -> list[Path]:
    folder.mkdir()
    paths = []
    for path in base:
        ds = pydicom.dcmread(path)
        if variant.charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = variant.charset
        for keyword, value in variant.values.items():
            if keyword != "IssuerOfPatientID":
                setattr(ds, keyword, value)
        for keyword in variant.removed:
            delattr(ds, keyword)
        issuer = variant.values["IssuerOfPatientID"]
        ds.IssuerOfPatientID = issuer
        item = _other_ids(issuer)
        _private(item)
        ds.OtherPatientIDsSequence = [item]
        _private(ds)
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return paths


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def outputs(
    request: pytest.FixtureRequest, base_ct: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Outputs:
    variant = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    paths = _write_variant(base_ct, folder / "ct", variant)
    headers = read_headers(paths)
    masks = synthetic_masks(len(headers), SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    encoded = encode(headers, masks, 0.001, segments=variant.segments)
    encoded.seg.save_as(folder / "seg.dcm", enforce_file_format=True)
    encoded.sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    # Every slice has the same patient and study values.
    return Outputs(paths[0], folder / "seg.dcm", folder / "sr.dcm", variant)


@pytest.fixture(params=["seg", "sr"])
def written(request: pytest.FixtureRequest, outputs: Outputs) -> Path:
    path: Path = getattr(outputs, request.param)
    return path


def _text(ds: Dataset, keyword: str) -> str | None:
    return None if keyword not in ds else str(ds[keyword].value)


def test_copied_values_decode_as_in_the_source(outputs: Outputs, written: Path) -> None:
    source, out = pydicom.dcmread(outputs.source), pydicom.dcmread(written)
    for keyword in COPIED:
        if keyword in outputs.variant.removed:
            # Type 2: present and empty (PS3.3 C.7.1.1, C.7.2.1), though the source lacked it.
            assert keyword in out and not out[keyword].value, keyword
        else:
            assert _text(out, keyword) == _text(source, keyword), keyword
    (item,) = out.OtherPatientIDsSequence
    assert str(item.IssuerOfPatientID) == str(source.OtherPatientIDsSequence[0].IssuerOfPatientID)


def test_specific_character_set_is_the_sources_or_utf8(outputs: Outputs, written: Path) -> None:
    out = pydicom.dcmread(written)
    assert out.get("SpecificCharacterSet") == outputs.variant.written
    if outputs.variant.written == outputs.variant.charset:
        # The source's own character set: the copied values are its bytes, unchanged but for
        # trailing empty component groups, which pydicom drops (PS3.5 Table 6.2-1, PN).
        source = pydicom.dcmread(outputs.source)
        for keyword in ("PatientName", "StudyDescription", "ReferringPhysicianName"):
            if keyword in source:
                got, want = (ds.get_item(keyword).value.rstrip(b"= ") for ds in (out, source))
                assert got == want, keyword


def test_private_elements_are_not_copied(outputs: Outputs, written: Path) -> None:
    out = pydicom.dcmread(written)
    assert [str(elem.tag) for elem in out.iterall() if elem.tag.is_private] == []


def test_outputs_pass_dciodvfy(written: Path) -> None:
    assert_dciodvfy_clean(written)


def test_outputs_pass_pixelmed(outputs: Outputs, written: Path) -> None:
    if "ISO 2022 IR 58" in (outputs.variant.charset or ()):
        # PS3.5 K.2's own bytes: PixelMed (20220618) stops reading them (an index error in
        # its GB 2312 decoder), so it cannot check the file; dciodvfy does.
        pytest.skip("PixelMed cannot read ISO 2022 IR 58 (GB 2312) values")
    assert_pixelmed_valid(written)


def test_our_own_text_survives_in_any_character_set(outputs: Outputs) -> None:
    seg, sr = pydicom.dcmread(outputs.seg), pydicom.dcmread(outputs.sr)
    specs = outputs.variant.segments
    assert [str(item.SegmentLabel) for item in seg.SegmentSequence] == [s.label for s in specs]
    texts = {str(elem.value) for elem in sr.iterall() if elem.keyword == "TextValue"}
    # Segments with voxels have measurement groups; the empty one is named in a Comment.
    masks = synthetic_masks(SYNTHETIC_SLICES, SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    empty = [spec for spec, mask in zip(specs, masks, strict=True) if not mask.any()]
    located = [spec.tracking_id for spec in specs if spec not in empty]
    assert empty and located
    assert {DISCLAIMER, empty_segments_comment(empty), *located} <= texts
