"""derive_uid and output_uids: valid, deterministic, and changing exactly when they should."""

from __future__ import annotations

import re
import uuid

import pytest

from agent.dicom.uids import OutputUids, derive_uid, output_uids
from tests.encode import model

UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
STUDY = "1.2.826.0.1.3680043.8.498.1"
INPUTS = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]


def _all(uids: OutputUids) -> list[str]:
    return [uids.seg_series, uids.seg_instance, uids.sr_series, uids.sr_instance]


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


def test_output_uids_change_with_model_version() -> None:
    first = _all(output_uids(STUDY, INPUTS, model("1.0.0")))
    second = _all(output_uids(STUDY, INPUTS, model("1.0.1")))
    assert not set(first) & set(second)


def test_output_uids_change_with_input_set() -> None:
    first = _all(output_uids(STUDY, INPUTS, model()))
    fewer = _all(output_uids(STUDY, INPUTS[:-1], model()))
    more = _all(output_uids(STUDY, [*INPUTS, "1.2.3.4.4"], model()))
    assert not set(first) & set(fewer)
    assert not set(first) & set(more)


def test_output_uids_need_inputs() -> None:
    with pytest.raises(ValueError):
        output_uids(STUDY, [], model())
