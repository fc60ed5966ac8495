"""Studies fetched from an archive: WADO-RS pulls, the QIDO-RS poller, completeness by count."""
