"""Which configuration file a command reads: --config, PACS_AGENT_CONFIG, the system file, or
none (the built-in defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PACS_AGENT_CONFIG"
# Where a package or an operator installs the host's configuration.
SYSTEM_CONFIG = Path("/etc/pacs-agent/config.toml")


@dataclass(frozen=True)
class ConfigSource:
    """The file the settings come from (None: the built-in defaults), and how it was chosen."""

    path: Path | None
    via: str  # "--config", ENV_VAR, "system file" or "defaults"

    def describe(self) -> str:
        """What a message names: the file, or "built-in defaults"."""
        return str(self.path) if self.path is not None else "built-in defaults"


def locate_config(
    flag: Path | None, environ: Mapping[str, str], system_path: Path = SYSTEM_CONFIG
) -> ConfigSource:
    """The configuration to read, first found of: `--config`, $PACS_AGENT_CONFIG (an empty
    value is unset), `system_path` when it exists, else the built-in defaults.

    A file named by --config or the variable must exist (loading it says so otherwise): a
    typo there is never silently replaced by the defaults.
    """
    if flag is not None:
        return ConfigSource(flag, "--config")
    named = environ.get(ENV_VAR, "")
    if named:
        return ConfigSource(Path(named), ENV_VAR)
    if system_path.is_file():
        return ConfigSource(system_path, "system file")
    return ConfigSource(None, "defaults")
