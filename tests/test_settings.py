"""Configuration: the example file is valid, bad files name the key, paths are file-relative."""

from __future__ import annotations

import logging
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
        (
            "[[destinations]]\nname='a'\nae_title='X'\nhost='h'\n",
            "'destinations.0': Value error, a dimse destination needs port",
        ),
        ("[[destinations]]\nname='w'\nkind='dicomweb'\n", "a dicomweb destination needs url"),
        (
            "[[destinations]]\nname='w'\nkind='dicomweb'\nurl='ftp://x'\n",
            "must start with http:// or https://",
        ),
        (
            "[[destinations]]\nname='w'\nkind='dicomweb'\nurl='https://x'\nhost='h'\n",
            'host: for kind = "dimse" (use an https:// url)',
        ),
        (
            "[[destinations]]\nname='w'\nkind='dicomweb'\nurl='https://x'\nauth={kind='bearer'}\n",
            "bearer auth needs token",
        ),
        ("[[models]]\nname='x'\ndevice='tpu'\n", "'models.0.device'"),
        ("[[models]]\nname='x'\nstate='stopped'\n", "'models.0.state'"),
        ("[[models]]\nname='x'\npriority='high'\n", "'models.0.priority'"),
        ("[queue]\nurgent_burst = 0\n", "'queue.urgent_burst'"),
        ("[queue]\nurgent_senders = ['']\n", "'queue.urgent_senders.0'"),
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


def test_priorities_and_model_switches(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "[queue]\nurgent_senders = ['ED_CT*']\nurgent_burst = 5\n"
        "[[models]]\nname = 'ct-tissue'\n"
        "[[models]]\nname = 'stroke'\npriority = 'urgent'\nstate = 'paused'\n"
        "[[models]]\nname = 'old'\nstate = 'off'\n",
    )
    settings = load_settings(path)
    assert settings.queue.urgent_senders == ("ED_CT*",)
    assert settings.queue.urgent_burst == 5
    assert [(m.name, m.priority, m.state) for m in settings.models] == [
        ("ct-tissue", "normal", "on"),
        ("stroke", "urgent", "paused"),
        ("old", "normal", "off"),
    ]


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError):
        settings.receiver.port = 1  # type: ignore[misc]


def test_deploy_example_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "deploy" / "scale-out.example.toml")
    assert not settings.queue.embedded
    assert settings.database_url.startswith("postgresql+psycopg://")


SECRET = "s3cret-Value-4-tests"


def test_secret_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key-password").write_text(SECRET + "\n")
    path = _write(
        tmp_path,
        "[receiver.tls]\ncertificate = 'tls/server.pem'\nprivate_key = 'tls/server.key'\n"
        "private_key_password = { file = 'secrets/key-password' }\n",
    )
    settings = load_settings(path)
    tls = settings.receiver.tls
    assert tls is not None and tls.private_key_password is not None
    assert tls.certificate == tmp_path / "tls" / "server.pem"
    assert tls.private_key == tmp_path / "tls" / "server.key"
    assert tls.private_key_password.file == tmp_path / "secrets" / "key-password"
    revealed = tls.private_key_password.reveal()
    assert revealed.get_secret_value() == SECRET  # the trailing newline is not part of it
    for shown in (repr(settings), str(settings), repr(revealed), str(revealed)):
        assert SECRET not in shown


def test_secret_from_a_named_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(
        tmp_path,
        "[[destinations]]\nname = 'pacs'\nae_title = 'PACS'\nhost = 'pacs'\nport = 2762\n"
        "[destinations.tls]\ncertificate = 'c.pem'\nprivate_key = 'k.pem'\n"
        "private_key_password = { env = 'PACS_AGENT_TEST_SECRET' }\n",
    )
    with caplog.at_level(logging.DEBUG):
        settings = load_settings(path)
        secret = settings.destinations[0].tls.private_key_password  # type: ignore[union-attr]
        assert secret is not None
        with pytest.raises(ConfigError, match="environment variable PACS_AGENT_TEST_SECRET"):
            secret.reveal()
        monkeypatch.setenv("PACS_AGENT_TEST_SECRET", SECRET)
        assert secret.reveal().get_secret_value() == SECRET
    assert SECRET not in repr(settings) + caplog.text + settings.model_dump_json()


@pytest.mark.parametrize(
    ("password", "message"),
    [
        (f"'{SECRET}'", "a secret is not written in the configuration file: use { file ="),
        ("{ file = 'a', env = 'B' }", "give exactly one of file or env"),
        ("{}", "give exactly one of file or env"),
        ("{ env = 'NOT-A-NAME' }", "'receiver.tls.private_key_password.env'"),
        ("{ value = 'x' }", "unknown key 'receiver.tls.private_key_password.value'"),
    ],
)
def test_bad_secret_references(tmp_path: Path, password: str, message: str) -> None:
    path = _write(
        tmp_path,
        "[receiver.tls]\ncertificate = 'c.pem'\nprivate_key = 'k.pem'\n"
        f"private_key_password = {password}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert message in str(info.value)
    assert "'receiver.tls.private_key_password" in str(info.value)
    # The refused value is not repeated, not even in the chained validation error.
    assert SECRET not in str(info.value) and SECRET not in str(info.value.__cause__)


def test_secret_file_problems_name_the_file_not_the_value(tmp_path: Path) -> None:
    from agent.settings import SecretRef

    missing = SecretRef(file=tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"cannot read secret file {tmp_path / 'missing'}"):
        missing.reveal()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        SecretRef(file=tmp_path / "empty").reveal()
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + SECRET.encode())
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        SecretRef(file=tmp_path / "binary").reveal()
    assert info.value.__cause__ is None and info.value.__context__ is not None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[receiver.tls]\ncertificate = 'c.pem'\nprivate_key = 'k.pem'\n"
            "require_client_certificate = true\n",
            "require_client_certificate needs ca_certificates",
        ),
        ("[receiver.tls]\ncertificate = 'c.pem'\n", "'receiver.tls.private_key'"),
        (
            "[[destinations]]\nname='a'\nae_title='X'\nhost='h'\nport=1\n"
            "tls = { certificate = 'c.pem' }\n",
            "certificate and private_key are given together",
        ),
        (
            "[[destinations]]\nname='a'\nae_title='X'\nhost='h'\nport=1\n"
            "tls = { verify_hostnames = false }\n",
            "unknown key 'destinations.0.tls.verify_hostnames'",
        ),
        ("[receiver]\naccepted_called_ae_titles = ['']\n", "accepted_called_ae_titles.0"),
    ],
)
def test_bad_tls_and_access_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_destination_tls_switch_and_paths(tmp_path: Path) -> None:
    from agent.settings import DestinationTls

    path = _write(
        tmp_path,
        "[[destinations]]\nname='sys'\nae_title='X'\nhost='pacs.example'\nport=2762\ntls=true\n"
        "[[destinations]]\nname='off'\nae_title='X'\nhost='h'\nport=104\ntls=false\n"
        "[[destinations]]\nname='own'\nae_title='X'\nhost='h'\nport=2762\n"
        "tls = { ca_certificates = '~/ca.pem', server_name = 'pacs.example' }\n",
    )
    system, off, own = load_settings(path).destinations
    assert system.tls == DestinationTls()
    assert system.tls.verify_hostname and system.tls.ca_certificates is None
    assert off.tls is None
    assert own.tls is not None and own.tls.ca_certificates == Path.home() / "ca.pem"
    assert own.tls.server_name == "pacs.example"


def test_called_ae_titles() -> None:
    from agent.settings import ReceiverSettings

    receiver = ReceiverSettings(ae_title="PACS_AGENT", accepted_called_ae_titles=("AI_SEG",))
    assert receiver.called_ae_titles == ("PACS_AGENT", "AI_SEG")


def test_the_configuration_is_found_by_flag_then_variable_then_system_file(
    tmp_path: Path,
) -> None:
    from agent.settings.locate import ENV_VAR, locate_config

    flag, named, system = tmp_path / "flag.toml", tmp_path / "named.toml", tmp_path / "sys.toml"
    env = {ENV_VAR: str(named)}
    assert locate_config(flag, env, system).path == flag
    assert locate_config(None, env, system).path == named
    # The system file only when it exists; else the built-in defaults, said as such.
    assert locate_config(None, {ENV_VAR: ""}, system).describe() == "built-in defaults"
    system.write_text("")
    assert locate_config(None, {}, system).path == system
    assert locate_config(None, {}, system).describe() == str(system)
    # A file named by the variable need not exist to be chosen: loading it then says so.
    assert locate_config(None, {ENV_VAR: str(tmp_path / "absent.toml")}, system).via == ENV_VAR
