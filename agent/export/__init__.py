"""Sending results to the PACS."""
