"""Model packages: a manifest and weights that bring a segmentation network to pacs-agent."""
