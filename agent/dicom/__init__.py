"""DICOM helpers shared by encoders: deterministic UIDs and the coded concepts we emit."""
