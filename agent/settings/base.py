"""The configuration's building blocks: the strict frozen section, shared field types, secrets.

Every section of the configuration derives from `_Section`; `_describe` turns a validation error
into the message a person reads (it names the key, never the value).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from agent.errors import ConfigError

AeTitle = Annotated[
    str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")
]
Port = Annotated[int, Field(ge=1, le=65535)]
# PS3.5 9.1: dot-separated numeric components without leading zeros, at most 64 characters.
UidStr = Annotated[str, Field(max_length=64, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")]
# A shell-style glob (`*`, `?`, `[...]`), matched case-insensitively against a whole value.
Pattern = Annotated[str, Field(min_length=1, max_length=200)]


class _Section(BaseModel):
    # Errors name the key, never repeat the value: it may be a secret written where it should not.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class SecretRef(_Section):
    """Where a secret is kept, a file or a named environment variable; never the value itself.

    `reveal()` reads it when it is used rather than when the configuration is loaded, so that
    commands which do not need it (`status`, `rules test`) run without access to it. A plain
    string in the configuration file is refused: that file is read by people and copied around.
    """

    file: Path | None = None
    env: EnvName | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                "a secret is not written in the configuration file: use "
                '{ file = "/run/secrets/NAME" } or { env = "VARIABLE" }'
            )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        return self

    def __str__(self) -> str:
        if self.file is not None:
            return f"secret file {self.file}"
        return f"environment variable {self.env}"

    def reveal(self) -> SecretStr:
        """Read the secret now; a ConfigError names where it was looked for, never the value."""
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read {self}: {exc.strerror}") from None
            except UnicodeDecodeError:
                # `from None`: the decode error carries the file's bytes.
                raise ConfigError(f"{self} is not UTF-8 text") from None
            # The newline that `echo` or an editor leaves is not part of the secret.
            value = text.rstrip("\r\n")
        else:
            assert self.env is not None
            if self.env not in os.environ:
                raise ConfigError(f"{self} is not set")
            value = os.environ[self.env]
        if not value:
            raise ConfigError(f"{self} is empty")
        return SecretStr(value)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: invalid value for '{key}': {first['msg']}"
