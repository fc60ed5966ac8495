"""Series selection rules per model, and `pacs-agent rules test`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from agent.assembly.rules import select
from agent.settings import ModelSettings, SelectRules
from tests.support.agent import cli
from tests.support.bombs import GIB, bomb_file
from tests.support.foreign import write_localizer, write_pdf, write_text_sr
from tests.support.phantom import PhantomTruth, write_phantom_series
from tests.support.receiver import minimal_ct
from tests.support.series import write_with_localizer

Headers = dict[Path, Dataset]


def _headers(*folders: Path | list[Path]) -> Headers:
    files: list[Path] = []
    for item in folders:
        files += item if isinstance(item, list) else sorted(item.glob("*.dcm"))
    return {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}


@pytest.fixture
def study(tmp_path: Path) -> tuple[PhantomTruth, Headers]:
    """An 8-slice axial CT (2.5 mm), a 4-slice second series, a localizer, an SR and a PDF."""
    main = write_phantom_series(tmp_path / "main", slices=8, rows=32, cols=32)
    small = write_phantom_series(
        tmp_path / "small", slices=4, rows=32, cols=32, study_uid=main.study_uid, series_number=2
    )
    others = [
        write_localizer(tmp_path / "loc", main.study_uid),
        write_text_sr(tmp_path / "x", main.study_uid),
        write_pdf(tmp_path / "x", main.study_uid),
    ]
    return main, _headers(list(main.files), list(small.files), others)


def _model(**rules: Any) -> ModelSettings:
    return ModelSettings(select=SelectRules(**rules))


def test_largest_series_is_taken_localizer_and_documents_are_not(
    study: tuple[PhantomTruth, Headers],
) -> None:
    truth, headers = study
    (choice,) = select(headers, [ModelSettings()])
    assert choice.input is not None
    assert choice.input.series_uid == truth.series_uid
    sops = [str(headers[f.path].SOPInstanceUID) for f in choice.input.frames]
    assert sops == list(truth.sop_uids)  # slice order
    reasons = {v.series.number: v.reason for v in choice.verdicts}
    assert reasons[1] == ""
    assert reasons[2] == ""  # fits; the larger series wins
    assert (
        reasons[100]
        == "ImageType ORIGINAL\\PRIMARY\\LOCALIZER matches exclude pattern '*LOCALIZER*'"
    )
    assert reasons[90] == "not an image series (Basic Text SR Storage)"
    assert reasons[91] == "not an image series (Encapsulated PDF Storage)"


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return apply


@pytest.mark.parametrize(
    ("rules", "change", "reason"),
    [
        ({"modalities": ("MR",)}, None, "ct-tissue: no MR series (modalities: CT)"),
        ({"body_parts": ("CHEST",)}, None, "BodyPartExamined '(empty)' matches no body_parts"),
        ({"body_parts": ("abd*",)}, _set("BodyPartExamined", "ABDOMEN"), ""),
        ({"body_parts": ("CHEST",)}, _set("BodyPartExamined", "ABDOMEN"), "'ABDOMEN' matches no"),
        ({"series_description_include": ("*abdomen*",)}, None, "matches no include pattern"),
        ({"series_description_include": ("PHANT*",)}, None, ""),
        ({"series_description_exclude": ("*ANTOM",)}, None, "exclude pattern '*ANTOM'"),
        ({"image_type_include": ("DERIVED*",)}, None, "ImageType matches no include pattern"),
        ({"image_type_include": ("ORIGINAL\\PRIMARY*",)}, None, ""),
        ({"min_slices": 9}, None, "8 slices, fewer than min_slices 9"),
        ({"max_slice_thickness_mm": 2.0}, None, "slice thickness 2.5 mm exceeds"),
        ({"max_slice_thickness_mm": 2.5}, None, ""),
        ({"orientation": "sagittal"}, None, "axial stack, the model takes sagittal"),
        ({"orientation": "any"}, None, ""),
        ({"contrast": "with"}, None, "no contrast agent recorded"),
        ({"contrast": "with"}, _set("ContrastBolusAgent", "IOMEPROL"), ""),
        (
            {"contrast": "without"},
            _set("ContrastBolusAgent", "IOMEPROL"),
            "contrast agent recorded",
        ),
        ({"contrast": "without"}, _set("ContrastBolusAgent", ""), ""),
    ],
)
def test_each_rule(
    tmp_path: Path,
    rules: dict[str, Any],
    change: Callable[[Dataset], None] | None,
    reason: str,
) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=8, rows=32, cols=32)
    headers = _headers(list(truth.files))
    for ds in headers.values():
        if change is not None:
            change(ds)
    (choice,) = select(headers, [_model(**rules)])
    if not reason:
        assert choice.input is not None, choice.reason
        assert len(choice.input.frames) == 8
    else:
        assert choice.input is None
        assert reason in choice.reason


def test_models_with_different_rules_take_different_series(
    study: tuple[PhantomTruth, Headers],
) -> None:
    truth, headers = study
    big = ModelSettings(name="ct-tissue")
    two = [ds for ds in headers.values() if ds.get("SeriesNumber") == 2]
    for ds in two:
        ds.SeriesDescription = "small FOV"
    small = ModelSettings(name="other", select=SelectRules(series_description_include=("small*",)))
    first, second = select(headers, [big, small])
    assert first.input is not None and first.input.series_uid == truth.series_uid
    assert second.input is not None and second.input.series_uid == two[0].SeriesInstanceUID


def test_series_without_decoder_is_named(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "ct", slices=4, rows=32, cols=32)
    headers = _headers(list(truth.files))
    for ds in headers.values():
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL Lossless
    (choice,) = select(headers, [ModelSettings()])
    assert choice.input is None
    assert "no decoder for" in choice.reason and "1.2.840.10008.1.2.4.110" in choice.reason


def test_rules_test_command_explains_every_series(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "study" / "ct", slices=8, rows=32, cols=32)
    write_phantom_series(
        tmp_path / "study" / "small",
        slices=6,
        rows=32,
        cols=32,
        study_uid=truth.study_uid,
        series_number=2,
    )
    write_localizer(tmp_path / "study" / "loc", truth.study_uid)
    write_pdf(tmp_path / "study" / "docs", truth.study_uid)
    (tmp_path / "study" / "README.txt").write_text("not DICOM")
    config = tmp_path / "agent.toml"
    config.write_text('[[models]]\nname = "ct-tissue"\n[models.select]\nmin_slices = 5\n')
    result = cli("rules", "test", str(tmp_path / "study"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "16 DICOM files" in out
    assert "not DICOM: README.txt (cannot read instance " in out
    assert "series 1 (CT, 8 instances) 'phantom': 8 x CT Image Storage" in out
    assert "stack: 8 axial slices, 2.5 x 1.5 x 1.5 mm" in out
    assert "ct-tissue: TAKES this series (8 slices)" in out
    assert "ct-tissue: fits, but another series is taken" in out
    assert "ct-tissue: no: ImageType ORIGINAL\\PRIMARY\\LOCALIZER matches exclude" in out
    assert "ct-tissue: no: not an image series (Encapsulated PDF Storage)" in out
    assert "PHANTOM" not in out

    missing = cli("rules", "test", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr


LOCALIZER_NOTE = (
    "1 instance dropped: ImageType ORIGINAL\\PRIMARY\\LOCALIZER matches exclude pattern "
    "'*LOCALIZER*'"
)


def test_a_localizer_inside_a_series_is_dropped_and_the_rest_taken(tmp_path: Path) -> None:
    series = write_with_localizer(tmp_path / "ct", 12)
    headers = series.headers()
    (choice,) = select(headers, [ModelSettings()])
    assert choice.input is not None, choice.reason
    assert choice.input.series_uid == series.series_uid
    assert len(choice.input.frames) == 12
    assert series.files[-1] not in choice.input.files
    assert choice.reason == LOCALIZER_NOTE
    (verdict,) = choice.verdicts
    assert verdict.note == LOCALIZER_NOTE


def test_a_series_left_with_too_few_instances_says_what_was_dropped(tmp_path: Path) -> None:
    headers = write_with_localizer(tmp_path / "ct", 4).headers()
    (choice,) = select(headers, [_model(min_slices=5)])
    assert choice.input is None
    assert "4 slices, fewer than min_slices 5" in choice.reason
    assert LOCALIZER_NOTE in choice.reason


def test_rules_test_command_drops_a_localizer_inside_a_series(tmp_path: Path) -> None:
    write_with_localizer(tmp_path / "study", 12)
    result = cli("rules", "test", str(tmp_path / "study"))
    assert result.returncode == 0, result.stderr
    assert f"ct-tissue: TAKES this series (12 slices); {LOCALIZER_NOTE}" in result.stdout


def test_rules_test_refuses_a_deflate_bomb_by_the_receiver_limit(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "study" / "ct", slices=6, rows=32, cols=32)
    bomb = minimal_ct()
    bomb.StudyInstanceUID = truth.study_uid
    bomb_file(tmp_path / "study" / "bomb.dcm", bomb, 2 * GIB)
    config = tmp_path / "agent.toml"
    config.write_text('[receiver]\nmax_instance_bytes = 67108864\n[[models]]\nname = "ct-tissue"\n')
    result = cli("rules", "test", str(tmp_path / "study"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "6 DICOM files" in result.stdout
    assert "refused: bomb.dcm (cannot read instance " in result.stdout
    assert "inflated dataset over the 67108864-byte limit)" in result.stdout
