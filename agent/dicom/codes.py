"""Coded concepts that the encoders put into SEG and SR, each with the standard that chose it."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from highdicom.sr import CodedConcept

from agent.domain import Code

# IHE RAD TF Suppl. AI Results (AIR) Rev 1.1, 6.5.3.1 "General Result Encoding Requirements":
# each algorithm that produced a result is described in the Contributing Equipment Sequence
# with Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"). DICOM has no standard
# code for it yet (CID 7005 holds only equipment purposes such as 109102 "Processing
# Equipment"); CID 7005 is extensible and "99" marks a private scheme (PS3.3 8.2), so the
# IHE placeholder is used exactly as the profile writes it.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
IHE_CODING_SCHEME = "99IHE"

# PS3.16 CID 7162 "Surface Processing Algorithm Families", used for the SEG Segmentation
# Algorithm Identification (PS3.3 C.8.20.2) and TID 4019 Algorithm Family.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

# TID 1500 "Procedure reported", BCID 100 "Quantitative Diagnostic Imaging Procedure": the
# member of CID 100 that names an examination of the source's modality (PS3.3 C.7.3.1.1.1) in
# any body region. (SCT 77477000 "Computed Tomography" is not in CID 100.)
CT_PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")
MR_PROCEDURE = Code("25056-3", "LN", "MRI unspecified body region")
_XR_PROCEDURE = Code("43468-8", "LN", "XR unspecified body region")
PROCEDURES: Mapping[str, Code] = MappingProxyType(
    {
        "CT": CT_PROCEDURE,
        "MR": MR_PROCEDURE,
        "PT": Code("44136-0", "LN", "PET unspecified body region"),
        "NM": Code("49118-3", "LN", "NM unspecified body region"),
        "CR": _XR_PROCEDURE,
        "DX": _XR_PROCEDURE,
    }
)
# The CID 100 member for any other modality.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")

# TID 1411 -> TID 1419 -> TID 300: $Measurement from BCID 7469 "Generic Intensity and Size
# Measurement", $Derivation from BCID 7464 "General Region of Interest Measurement Modifier",
# $Units from BCID 7181 "Abstract Multi-dimensional Image Model Component Unit".
VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
# CID 7181 lists volumes as "cm3" (not the equal UCUM "ml"); 1 cm3 = 1 ml.
CUBIC_CENTIMETER = Code("cm3", "UCUM", "cubic centimeter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")

# CID 7150 "Segmentation Property Category": segments of this category are organs or body
# parts, so their property type also names where the finding is (TID 1411 Finding Site).
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
# CID 7150 category for tissue classes that are not one organ (fat, muscle, soft tissue).
TISSUE = Code("85756007", "SCT", "Tissue")
# The same category as older PS3.16 editions and tools (dcmqi, TotalSegmentator) code it.
LEGACY_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")

# TID 1411 row "Source series for segmentation", as PS3.16 spells it: highdicom writes
# "Source Series for Segmentation", which validators report as a meaning that differs.
SOURCE_SERIES_FOR_SEGMENTATION = Code("121232", "DCM", "Source series for segmentation")

# TID 1500 is an extensible template (PS3.16); the research-use disclaimer is a TEXT item with
# (121106, DCM, "Comment") under the report root.
COMMENT = Code("121106", "DCM", "Comment")


def procedure_reported(modality: str) -> Code:
    """The TID 1500 Procedure Reported (CID 100) for a source of `modality` (PS3.3 C.7.3.1)."""
    return PROCEDURES.get(modality, IMAGING_PROCEDURE)


def coded(code: Code) -> CodedConcept:
    """The highdicom form of a domain `Code`."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
