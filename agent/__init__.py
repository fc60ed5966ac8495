"""pacs-agent: DICOM in, AI segmentation, DICOM SEG + TID 1500 SR back to the PACS."""

__version__ = "0.1.0"
