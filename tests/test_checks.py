"""`check-config` creating nothing, probing an existing spool, and naming a busy port."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.agent import cli, write_config
from tests.support.ports import free_port


def test_a_busy_receiver_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, port=port)
        result = cli("check-config", "--config", str(config))
    assert result.returncode == 1
    assert f"FAIL  receiver port {port} is in use (on 127.0.0.1)" in result.stdout.splitlines()
    assert any(
        line.startswith("ok    web port 0 on 127.0.0.1") for line in result.stdout.splitlines()
    )


def test_an_existing_spool_is_probed_and_left_as_it_was(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port())
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok    spool {tmp_path / 'spool'}" in result.stdout.splitlines()
    assert [p.name for p in (tmp_path / "spool").rglob("*")] == ["tmp"]
    assert not (tmp_path / "pacs-agent.db").exists()


def test_the_database_is_named_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://agent:s3cret@127.0.0.1:{free_port()}/none"
    config = write_config(tmp_path, port=free_port(), database_url=url)
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line[6:].startswith("database")]
    assert len(lines) == 1
    assert lines[0].startswith("FAIL  database postgresql+psycopg://agent@127.0.0.1:")
    assert "s3cret" not in result.stdout + result.stderr
