"""The exit codes of `pacs-agent`."""

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# sysexits.h EX_TEMPFAIL: a source or the spool is unavailable now; the same command may work later.
EXIT_TEMPFAIL = 75
