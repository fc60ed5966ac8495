"""derive_uid and output_uids: valid, deterministic, and changing exactly when they should."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

import pytest

from agent.dicom.uids import OutputUids, derive_uid, encoder_identity, output_uids
from agent.domain import ModelIdentity
from tests.encode import model

UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
STUDY = "1.2.826.0.1.3680043.8.498.1"
INPUTS = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]


def _all(uids: OutputUids) -> list[str]:
    return [uids.seg_series, uids.seg_instance, uids.sr_series, uids.sr_instance]


def _series(uids: OutputUids) -> list[str]:
    return [uids.seg_series, uids.sr_series]


def _instances(uids: OutputUids) -> list[str]:
    return [uids.seg_instance, uids.sr_instance]


@pytest.mark.parametrize(
    "parts",
    [("a",), ("",), ("study", "x" * 1000), ("ünïcode", "\x00"), tuple(str(i) for i in range(50))],
)
def test_derive_uid_is_a_valid_uid(parts: tuple[str, ...]) -> None:
    uid = derive_uid(*parts)
    assert UID_SYNTAX.match(uid), uid
    assert len(uid) <= 64
    assert uid.startswith("2.25.")


def test_derive_uid_is_a_version_8_uuid() -> None:
    value = uuid.UUID(int=int(derive_uid("x")[len("2.25.") :]))
    assert value.version == 8
    assert value.variant == uuid.RFC_4122


def test_derive_uid_is_deterministic_and_unambiguous() -> None:
    assert derive_uid("a", "b") == derive_uid("a", "b")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("a", "b") != derive_uid("b", "a")
    assert derive_uid("a") != derive_uid("a", "")


def test_derive_uid_needs_parts() -> None:
    with pytest.raises(ValueError):
        derive_uid()


def test_output_uids_are_valid_and_distinct() -> None:
    uids = _all(output_uids(STUDY, INPUTS, model()))
    assert len(set(uids)) == 4
    for uid in uids:
        assert UID_SYNTAX.match(uid) and len(uid) <= 64


def test_output_uids_ignore_input_order() -> None:
    assert output_uids(STUDY, INPUTS, model()) == output_uids(STUDY, INPUTS[::-1], model())


def test_new_model_version_gives_new_instances_in_the_same_series() -> None:
    first = output_uids(STUDY, INPUTS, model("1.0.0"))
    second = output_uids(STUDY, INPUTS, model("1.0.1"))
    assert not set(_instances(first)) & set(_all(second))
    assert _series(first) == _series(second)


def test_new_input_set_gives_new_instances_in_the_same_series() -> None:
    # Late arrivals: the study is processed again, and the new revision joins the series.
    first = output_uids(STUDY, INPUTS, model())
    for changed in (INPUTS[:-1], [*INPUTS, "1.2.3.4.4"]):
        revision = output_uids(STUDY, changed, model())
        assert not set(_instances(first)) & set(_all(revision))
        assert _series(first) == _series(revision)


def test_new_model_name_or_study_gives_new_series() -> None:
    first = output_uids(STUDY, INPUTS, model())
    renamed = output_uids(STUDY, INPUTS, ModelIdentity("ct-organs", "1.0.0", "m", "1.2.3"))
    elsewhere = output_uids(STUDY + ".2", INPUTS, model())
    for changed in (renamed, elsewhere):
        assert not set(_all(first)) & set(_all(changed))


def test_instance_uids_derive_from_inputs_model_weights_and_encoder() -> None:
    uids = output_uids(STUDY, INPUTS[::-1], model())
    identity = model()
    parts = (
        STUDY,
        *sorted(INPUTS),
        identity.name,
        identity.version,
        identity.device_uid,
        encoder_identity(),
    )
    assert uids.seg_instance == derive_uid(*parts, "seg-instance")
    assert uids.sr_instance == derive_uid(*parts, "sr-instance")


def test_new_weights_under_the_same_version_give_new_instances_in_the_same_series() -> None:
    """The Device UID derives from the weights' SHA-256: retrained weights published under an
    unchanged version string make other content, so other SOP Instance UIDs (PS3.5 9)."""
    first = output_uids(STUDY, INPUTS, model())
    retrained = replace(model(), device_uid=derive_uid("other weights"))
    second = output_uids(STUDY, INPUTS, retrained)
    assert not set(_instances(first)) & set(_all(second))
    assert _series(first) == _series(second)


def test_another_encoder_gives_new_instances_in_the_same_series() -> None:
    """A fix in pacs-agent, highdicom or pydicom may change the bytes of the same result."""
    first = output_uids(STUDY, INPUTS, model())
    assert output_uids(STUDY, INPUTS, model(), encoder=encoder_identity()) == first
    for other in ("pacs-agent 9.9.9; highdicom 0.28.2; pydicom 3.0.2", "highdicom 1.0"):
        second = output_uids(STUDY, INPUTS, model(), encoder=other)
        assert not set(_instances(first)) & set(_all(second))
        assert _series(first) == _series(second)


def test_encoder_identity_names_the_service_and_its_encoders() -> None:
    identity = encoder_identity()
    for name in ("pacs-agent ", "highdicom ", "pydicom "):
        assert name in identity


def test_labelmap_seg_and_its_sr_are_other_instances_in_the_same_series() -> None:
    binary = output_uids(STUDY, INPUTS, model())
    assert output_uids(STUDY, INPUTS, model(), seg_type="binary") == binary
    labelmap = output_uids(STUDY, INPUTS, model(), seg_type="labelmap")
    assert not set(_instances(binary)) & set(_instances(labelmap))
    assert _series(binary) == _series(labelmap)


def test_output_uids_need_inputs() -> None:
    with pytest.raises(ValueError):
        output_uids(STUDY, [], model())


def test_other_content_under_the_same_input_uids_gives_new_instances() -> None:
    """One SOP Instance UID must not name two objects (PS3.5 9): results of a slice re-sent
    with other pixels under its UID are other objects, in the same series."""
    before = {sop: "a" * 64 for sop in INPUTS}
    after = {**before, INPUTS[1]: "b" * 64}
    first = output_uids(STUDY, INPUTS, model(), before)
    second = output_uids(STUDY, INPUTS, model(), after)
    assert not set(_instances(first)) & set(_all(second))
    assert _series(first) == _series(second)
    assert output_uids(STUDY, INPUTS[::-1], model(), dict(before)) == first


def test_unknown_contents_keep_the_uids_of_results_made_before_digests() -> None:
    plain = output_uids(STUDY, INPUTS, model())
    assert output_uids(STUDY, INPUTS, model(), {}) == plain
    assert output_uids(STUDY, INPUTS, model(), {sop: "" for sop in INPUTS}) == plain
