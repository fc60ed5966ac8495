"""Choose the Specific Character Set a SEG or SR is written with: the source's, else UTF-8.

highdicom builds every object with BUILD_CHARACTER_SET; `equipment.stamp_instance` then sets
the value `output_character_set` picks (PS3.3 C.12.1.1.2, PS3.5 6.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pydicom import Dataset
from pydicom.charset import custom_encoders, python_encoding
from pydicom.multival import MultiValue

# Unicode in UTF-8 (PS3.3 C.12.1.1.2, Table C.12-5) encodes any text. highdicom builds with it
# (its own check rejects valid values such as "\ISO 2022 IR 87" and "ISO 2022 IR 149"), and
# `equipment.stamp_instance` then sets the value that the finished object is written with.
BUILD_CHARACTER_SET = "ISO_IR 192"
# PS3.3 C.12.1.1.2 defined terms that pydicom can also write: single-valued without code
# extensions (Tables C.12-2, C.12-5), and the terms with code extensions (C.12-3, C.12-4).
_STAND_ALONE = frozenset(
    {
        *(f"ISO_IR {n}" for n in (13, 100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 192)),
        "GB18030",
        "GBK",
    }
) & frozenset(python_encoding)
_SINGLE_BYTE_EXTENSIONS = frozenset(
    f"ISO 2022 IR {n}" for n in (6, 13, 100, 101, 109, 110, 126, 127, 138, 144, 148, 166)
) & frozenset(python_encoding)
# pydicom 3.0 keeps the escape sequences of ISO 2022 IR 58 text in the decoded value and
# writes them back as read: keeping the source's value (rather than UTF-8) keeps its bytes.
_MULTI_BYTE_EXTENSIONS = frozenset(f"ISO 2022 IR {n}" for n in (58, 87, 149, 159))
# The default repertoire (PS3.5 6.1.2.1) is ASCII; pydicom reads it permissively as Latin-1.
_DEFAULT_REPERTOIRE = ("", "ISO 2022 IR 6")
# Value representations whose text Specific Character Set governs (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def output_character_set(instance: Dataset, source: Dataset) -> list[str]:
    """The Specific Character Set values to write `instance` with; [] for the default repertoire.

    The source's own value where it is a valid PS3.3 C.12.1.1.2 value and every text value
    of `instance` (copied from the source or ours) can be encoded with it, so the PACS gets
    the results in the character set of the images; otherwise ISO_IR 192 (UTF-8), which
    encodes anything. A source that declares nothing yet holds non-ASCII text (an encoding
    defect that pydicom reads as Latin-1) thus gives UTF-8 objects with the same decoded text.

    Visiting every value also decodes any element still held as raw bytes (pydicom decodes
    on access), so that pydicom re-encodes it with the chosen character set on writing
    rather than copying bytes in the source's encoding.
    """
    declared = _declared_character_set(source)
    if declared is not None and all(_encodable(text, declared) for text in _texts(instance)):
        return declared
    return [BUILD_CHARACTER_SET]


def _declared_character_set(source: Dataset) -> list[str] | None:
    """The source's Specific Character Set as a list, or None if it is not a valid value."""
    raw = source.get("SpecificCharacterSet")
    values = [raw] if raw is None or isinstance(raw, str) else list(raw)
    terms = [str(value or "").strip() for value in values]
    if not any(terms):
        return []
    if len(terms) == 1:
        return terms if terms[0] in _STAND_ALONE | _SINGLE_BYTE_EXTENSIONS else None
    # PS3.3 C.12.1.1.2: with several values, all use code extensions (ISO 2022), and the
    # first (empty for ISO 2022 IR 6) is a single-byte set.
    first_ok = terms[0] in ("", *_SINGLE_BYTE_EXTENSIONS)
    rest_ok = all(t in _SINGLE_BYTE_EXTENSIONS | _MULTI_BYTE_EXTENSIONS for t in terms[1:])
    return terms if first_ok and rest_ok else None


def _encodable(text: str, terms: Sequence[str]) -> bool:
    """Whether every character of `text` is in one of the character sets that `terms` name.

    pydicom switches between the sets of a code-extension value as it goes (PS3.5 6.1.2.5),
    so one of them holding each character is enough.
    """
    codecs = ["ascii" if t in _DEFAULT_REPERTOIRE else python_encoding[t] for t in terms or [""]]
    return all(char.isascii() or any(_has(char, c) for c in codecs) for char in text)


def _has(char: str, codec: str) -> bool:
    # As pydicom encodes: its own encoders where Python's codec is wider than the DICOM set
    # (ISO_IR 13 is JIS X 0201 alone, not all of Shift JIS).
    encoder = custom_encoders.get(codec)
    try:
        if encoder is not None:
            encoder(char)
        else:
            char.encode(codec)
    except UnicodeError:
        return False
    return True


def _texts(instance: Dataset) -> Iterator[str]:
    """Every text value of `instance` that Specific Character Set governs, nested ones too."""
    for elem in instance.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        yield from (str(value) for value in values)


__all__ = ["BUILD_CHARACTER_SET", "output_character_set"]
