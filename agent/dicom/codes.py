"""Coded concepts that the encoders put into SEG and SR, each with the standard that chose it."""

from __future__ import annotations

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

# TID 1500 "Procedure reported", BCID 100 "Quantitative Diagnostic Imaging Procedure":
# the member of CID 100 that names a CT of any body region. (SCT 77477000 "Computed
# Tomography" is not in CID 100.)
CT_PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")

# TID 1411 -> TID 1419 -> TID 300: $Measurement from BCID 7469 "Generic Intensity and Size
# Measurement", $Derivation from BCID 7464 "General Region of Interest Measurement Modifier",
# $Units from BCID 7181 "Abstract Multi-dimensional Image Model Component Unit".
VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
# UCUM "ml" (PS3.16 uses the "ml" spelling in CID 7181, e.g. "ml/s"); 1 ml = 1 cm3.
MILLILITER = Code("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")

# CID 7150 "Segmentation Property Category": segments of this category are organs or body
# parts, so their property type also names where the finding is (TID 1411 Finding Site).
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
# CID 7150 category for tissue classes that are not one organ (fat, muscle, soft tissue).
TISSUE = Code("85756007", "SCT", "Tissue")
# The same category as older PS3.16 editions and tools (dcmqi, TotalSegmentator) code it.
LEGACY_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")

# TID 1500 is an extensible template (PS3.16); the research-use disclaimer is a TEXT item with
# (121106, DCM, "Comment") under the report root.
COMMENT = Code("121106", "DCM", "Comment")


def coded(code: Code) -> CodedConcept:
    """The highdicom form of a domain `Code`."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
