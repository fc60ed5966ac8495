"""DICOMweb clients (STOW-RS out, WADO-RS and QIDO-RS in): sessions, auth and error meaning."""
