"""The error tree: what may be retried, what may not, and what ends a study as skipped."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error pacs-agent raises on purpose."""


class RetryableError(AgentError):
    """A transient fault (peer down, broker unavailable, disk busy): try again later."""


class PermanentError(AgentError):
    """The input or the configuration is wrong: retrying gives the same result."""


class StudySkipped(AgentError):
    """Nothing in the study is usable by the model; the study ends as `skipped` with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(PermanentError):
    """The configuration file is invalid; the message names the key."""


class JobHeld(AgentError):
    """A model of the job is paused: the study waits, queued, until it is switched on again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
