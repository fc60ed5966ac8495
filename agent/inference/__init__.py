"""Series selection, volume loading and segmentation models."""
