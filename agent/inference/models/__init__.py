"""Built-in segmentation models."""
