"""Deterministic DICOM UIDs, so that re-processing the same input yields the same output objects."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

from agent import __version__
from agent.domain import ModelIdentity

# PS3.3 C.8.20.2: how a SEG stores its segments. BINARY has one frame per segment and slice;
# LABELMAP (Label Map Segmentation Storage) one frame per slice holding segment numbers.
SegType = Literal["binary", "labelmap"]

# PS3.5 9.1: dot-separated numeric components without leading zeros.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# JPEG XL (PS3.5 A.4.13), newer than the pydicom release we pin, which does not name it.
JPEG_XL_SYNTAXES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


def is_valid_uid(value: str) -> bool:
    """A UID by PS3.5 9.1: at most 64 characters of numeric components. Checking this also
    keeps a hostile UID from naming a path outside the spool."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


# PS3.5 B.2: a UID may be "2.25." followed by the decimal form of a 128-bit UUID
# (ISO/IEC 9834-8); at most 39 digits, so 44 characters in all, well under the 64 of PS3.5 9.1.
_UUID_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """Return a UID under 2.25 derived from sha256 of `parts`; equal parts give an equal UID.

    Each part is length-prefixed before hashing, so ("ab", "c") and ("a", "bc") differ.
    The 128-bit value is shaped as an RFC 9562 version-8 UUID (custom, name-derived), so the
    result is a UUID-derived UID as PS3.5 B.2 describes and cannot collide with random
    (version 4) UUID UIDs that other systems mint under 2.25.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    value = int.from_bytes(digest.digest()[:16], "big")
    # RFC 9562 4.1/4.2: version nibble (bits 48-51 from the top) = 8, variant bits = 0b10.
    value &= ~(0xF << 76)
    value |= 0x8 << 76
    value &= ~(0x3 << 62)
    value |= 0x2 << 62
    return f"{_UUID_ROOT}{value}"


@dataclass(frozen=True)
class OutputUids:
    """The Series and SOP Instance UIDs of the SEG and SR produced for one input and model."""

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str


def encoder_identity() -> str:
    """The software that turns a result into bytes: this service, highdicom and pydicom.

    A fix in any of them may change the objects' content, so it enters their SOP Instance
    UIDs (see `output_uids`).
    """
    return (
        f"pacs-agent {__version__}; highdicom {version('highdicom')}; pydicom {version('pydicom')}"
    )


def output_uids(
    study_uid: str,
    input_sop_uids: Sequence[str],
    model: ModelIdentity,
    contents: Mapping[str, str] | None = None,
    *,
    encoder: str | None = None,
    seg_type: SegType = "binary",
) -> OutputUids:
    """Derive the output UIDs from the study, the set of input instances, the model and the
    encoder.

    Series Instance UIDs derive from (study, model name, kind) only: every run of one model
    on one study, whatever its input or model version, adds to the same result series, where
    the higher Instance Number marks the newest revision (late arrivals, model upgrades).
    SOP Instance UIDs derive from (study, the set of input instances, model name and version,
    the model's Device UID, the encoder, kind): the same inputs give the same UIDs, so a
    repeat sends identical objects (the PACS sees the same instances again rather than
    duplicates); a new input instance, a new model version, new weights under the same
    version (the Device UID derives from the weights' SHA-256) or another encoder
    (`encoder`, by default `encoder_identity()`) gives new UIDs, because then the content
    may differ and one SOP Instance UID must not name two different objects (PS3.5 9).

    `seg_type` is the SEG's form; a LABELMAP SEG is other content than the BINARY one of the
    same result, and the SR that references it is another SR: both get other SOP Instance
    UIDs (the BINARY ones derive without the type), in the same series.

    `contents` gives the content digest of input instances by SOP Instance UID: an input
    re-sent with other content under its UID gives new SOP Instance UIDs too. An input whose
    digest is not known (absent or empty) adds nothing, so results made before digests were
    kept keep their UIDs.
    """
    if not input_sop_uids:
        raise ValueError("output_uids needs at least one input SOP Instance UID")
    inputs = sorted(set(input_sop_uids))
    known = contents or {}
    # A UID has no ":", so these parts cannot be mistaken for an input's UID.
    digests = [f"{sop}:{known[sop]}" for sop in inputs if known.get(sop)]

    def series(kind: str) -> str:
        return derive_uid(study_uid, model.name, f"{kind}-series")

    made_by = encoder_identity() if encoder is None else encoder
    form = ["labelmap"] if seg_type == "labelmap" else []

    def instance(kind: str) -> str:
        return derive_uid(
            study_uid,
            *inputs,
            *digests,
            model.name,
            model.version,
            model.device_uid,
            made_by,
            f"{kind}-instance",
            *form,
        )

    return OutputUids(
        seg_series=series("seg"),
        seg_instance=instance("seg"),
        sr_series=series("sr"),
        sr_instance=instance("sr"),
    )
