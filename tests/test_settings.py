"""Configuration: the example file is valid, bad files name the key, paths are file-relative."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.settings import Settings, load_settings
from tests.support.data import REPO_ROOT


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_mirrors_defaults() -> None:
    settings = load_settings(REPO_ROOT / "config.example.toml")
    defaults = Settings()
    assert settings.receiver == defaults.receiver
    assert settings.queue == defaults.queue
    assert settings.study.quiet_seconds == 30
    assert settings.spool.path == (REPO_ROOT / "pacs-agent-data" / "spool").resolve()
    assert settings.database_url == f"sqlite:///{REPO_ROOT / 'pacs-agent-data' / 'pacs-agent.db'}"


def test_every_settings_key_is_documented_in_the_example() -> None:
    text = (REPO_ROOT / "config.example.toml").read_text()
    for section, model in Settings.model_fields.items():
        assert section in text
        sub = model.annotation
        fields = getattr(sub, "model_fields", None) or {}
        for key in fields:
            assert f"{key} =" in text or f"{key}=" in text, f"{section}.{key} undocumented"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[receiver]\nprot = 1\n", "unknown key 'receiver.prot'"),
        ("[receiver]\nport = 70000\n", "'receiver.port'"),
        ("[receiver]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "'receiver.ae_title'"),
        ("[queue]\nbroker_url = 'amqp://x'\n", "'queue.broker_url'"),
        ("[study]\nquiet_seconds = -1\n", "'study.quiet_seconds'"),
        ("[[destinations]]\nname='a'\nae_title='X'\nhost='h'\n", "'destinations.0.port'"),
        ("[[models]]\nname='x'\ndevice='tpu'\n", "'models.0.device'"),
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("[receiver\n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "[spool]\npath = 'data/spool'\n[database]\nurl = 'sqlite:///db/agent.db'\n"
    )
    settings = load_settings(path)
    assert settings.spool.path == tmp_path / "data" / "spool"
    assert settings.database_url == f"sqlite:///{tmp_path / 'db' / 'agent.db'}"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError):
        settings.receiver.port = 1  # type: ignore[misc]


def test_deploy_example_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "deploy" / "scale-out.example.toml")
    assert not settings.queue.embedded
    assert settings.database_url.startswith("postgresql+psycopg://")
