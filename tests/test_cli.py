"""The command line: exit codes, one-line messages, check-config and echo against a real PACS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import cli, write_config
from tests.support.orthanc import Orthanc
from tests.support.ports import free_port


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as pacs:
        yield pacs


def test_check_config_reports_each_part(orthanc: Orthanc, tmp_path: Path, redis_url: str) -> None:
    dead = free_port()  # nothing listens there
    config = write_config(
        tmp_path,
        port=free_port(),
        broker_url=redis_url,
        destinations=[
            (orthanc.aet, "127.0.0.1", orthanc.dicom_port),
            ("NOBODY", "127.0.0.1", dead),
        ],
        extra=(
            '[[models]]\nname = "ct-tissue"\n'
            f'[[models]]\nname = "organs"\npackage = "{tmp_path / "no-such-package"}"\n'
        ),
    )
    result = cli("check-config", "--config", str(config))
    lines = result.stdout.splitlines()
    assert "ok    model ct-tissue" in lines
    assert any(line.startswith("FAIL  model organs: ") for line in lines)
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("ok    spool") for line in lines)
    assert any(line.startswith("ok    database") for line in lines)
    assert any(line.startswith("ok    broker redis://") for line in lines)
    assert any(line.startswith("ok    destination pacs0") for line in lines)
    assert any(line.startswith("FAIL  destination pacs1") for line in lines)


def test_check_config_all_ok_exits_zero(orthanc: Orthanc, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, port=free_port(), destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)]
    )
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stdout
    assert "FAIL" not in result.stdout


def test_broker_down_is_reported(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, port=free_port(), broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    result = cli("check-config", "--config", str(config), timeout=120)
    assert result.returncode == 1
    assert "FAIL  broker redis://" in result.stdout


def test_echo(orthanc: Orthanc, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        port=free_port(),
        destinations=[
            (orthanc.aet, "127.0.0.1", orthanc.dicom_port),
            ("NOBODY", "127.0.0.1", free_port()),
        ],
    )
    ok = cli("echo", "--config", str(config), "pacs0")
    assert ok.returncode == 0 and "success" in ok.stdout
    down = cli("echo", "--config", str(config), "pacs1")
    assert down.returncode == 1
    assert down.stderr.strip().count("\n") == 0 and "pacs1" in down.stderr
    unknown = cli("echo", "--config", str(config), "nope")
    assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[receiver]\nport = 'eleven'\n")
    for command in ("serve", "status", "check-config"):
        result = cli(command, "--config", str(config))
        assert result.returncode == 2
        assert "receiver.port" in result.stderr and str(config) in result.stderr
        assert result.stderr.strip().count("\n") == 0


def test_missing_config_file(tmp_path: Path) -> None:
    result = cli("status", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "cannot read configuration file" in result.stderr


def test_worker_refuses_the_in_memory_broker(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port())
    result = cli("worker", "--config", str(config))
    assert result.returncode == 2 and "memory://" in result.stderr


def test_status_without_studies(tmp_path: Path) -> None:
    from tests.support.agent import agent_database

    config = write_config(tmp_path, port=free_port())
    with agent_database(config) as db:
        db.create_schema()  # as `serve` leaves it
    result = cli("status", "--config", str(config))
    assert result.returncode == 0 and result.stdout.strip() == "no studies yet"


def test_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, port=port)
        result = cli("serve", "--config", str(config))
    assert result.returncode == 1
    assert f"receiver cannot listen on 127.0.0.1:{port}" in result.stderr.splitlines()[-1]


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    config = write_config(tmp_path, port=free_port(), database_url=url)
    result = cli("status", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("pacs-agent: database unavailable:")
    assert result.stderr.strip().count("\n") == 0


def test_retry_assembles_a_skipped_study_again_and_names_unknown_keys(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from agent.db.database import Database
    from agent.db.states import State
    from agent.db.values import ArrivedInstance
    from agent.settings import load_settings

    config = write_config(tmp_path, port=free_port())
    db = Database(load_settings(config).database_url)
    db.create_schema()
    arrival = ArrivedInstance(
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
        "1.2.840.10008.5.1.4.1.1.2",
        tmp_path / "x.dcm",
        datetime.now(UTC),
    )
    [key] = db.record_arrivals([arrival])
    db.transition("1.2.3", State.COMPLETE, "1 instances")
    db.transition("1.2.3", State.SKIPPED, "ct-tissue: no series fits")

    retried = cli("retry", key, "--config", str(config))
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.split() == [key, "to", "be", "assembled", "again"]
    study = db.get("1.2.3")
    assert study is not None and study.state == State.RECEIVING
    assert study.reason == "retry requested: assembled again"

    unknown = cli("retry", "abcdef0", "--config", str(config))
    assert unknown.returncode == 1
    assert "no single study with key 'abcdef0'" in unknown.stderr
    nothing = cli("retry", "--all-failed", "--config", str(config))
    assert nothing.returncode == 0 and nothing.stdout.strip() == "no failed studies"
    db.dispose()
    elsewhere = write_config(tmp_path / "other", port=free_port())
    none = cli("retry", "--all-failed", "--config", str(elsewhere))
    assert none.returncode == 1 and "no database at sqlite:///" in none.stderr
    assert not (tmp_path / "other" / "pacs-agent.db").exists()


def test_check_config_and_echo_ask_a_dicomweb_destination_by_qido(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    dead_port = free_port()
    dead = f"http://127.0.0.1:{dead_port}/dicom-web"
    extra = "".join(
        f'[[destinations]]\nname = "{name}"\nkind = "dicomweb"\nurl = "{url}"\n'
        for name, url in (("web", orthanc.dicomweb_url), ("gone", dead))
    )
    config = write_config(tmp_path, port=free_port(), extra=extra)
    result = cli("check-config", "--config", str(config))
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"ok    destination web ({orthanc.dicomweb_url}) QIDO-RS" in lines
    assert any(
        line.startswith(f"FAIL  destination gone ({dead}) QIDO-RS")
        and f"connection refused at 127.0.0.1:{dead_port}" in line
        for line in lines
    ), lines
    echo = cli("echo", "web", "--config", str(config))
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout.strip() == f"QIDO-RS web ({orthanc.dicomweb_url}): success"


def test_models_check_reports_a_package_and_names_a_bad_one(tmp_path: Path) -> None:
    from tests.models.packages import unet, write_torchscript

    folder = write_torchscript(tmp_path / "pkg", unet())
    ok = cli("models", "check", str(folder), timeout=120)
    assert ok.returncode == 0, ok.stderr
    fields = dict(
        line.split(None, 1) for line in ok.stdout.replace("device uid", "uid").splitlines()
    )
    assert fields["name"] == "tiny-unet" and fields["version"] == "0.1.0"
    assert len(fields["sha256"]) == 64
    assert fields["uid"].startswith("2.25.")
    assert fields["outputs"] == "1 Liver, 2 Spleen"
    assert fields["run"].endswith("24x24x24 synthetic volume on cpu")
    (folder / "model.pt").unlink()
    bad = cli("models", "check", str(folder), timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "weights file model.pt is missing" in bad.stderr


def test_models_list_shows_the_built_in_and_packages(tmp_path: Path) -> None:
    from tests.models.packages import unet, write_torchscript

    write_torchscript(tmp_path / "pkg", unet())
    extra = '[[models]]\nname = "ct-tissue"\n[[models]]\nname = "organs"\npackage = "pkg"\n'
    config = write_config(tmp_path, port=free_port(), extra=extra)
    result = cli("models", "list", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "ok    ct-tissue: built-in; state on",
        f"ok    organs: package tiny-unet 0.1.0, {(tmp_path / 'pkg').resolve()}; state on",
    ]
    (tmp_path / "pkg" / "model.toml").write_text("manifest_version = 1\n")
    broken = cli("models", "list", "--config", str(config))
    assert broken.returncode == 1
    assert "FAIL  organs: " in broken.stdout and "'model'" in broken.stdout


def test_models_are_switched_at_run_time_and_listed_with_their_state(
    tmp_path: Path, database_url: str
) -> None:
    from agent.db.database import Database
    from agent.db.switches import ModelSwitches
    from agent.settings import load_settings

    extra = '[[models]]\nname = "ct-tissue"\n[[models]]\nname = "stroke"\nstate = "paused"\n'
    config = write_config(tmp_path, port=free_port(), database_url=database_url, extra=extra)

    def models(*args: str) -> list[str]:
        result = cli("models", *args, "--config", str(config))
        assert result.returncode in (0, 1), result.stderr
        return result.stdout.splitlines()

    def effective() -> dict[str, str]:
        db = Database(database_url)
        try:
            return dict(ModelSwitches(db).effective(load_settings(config).models))
        finally:
            db.dispose()

    assert models("off", "ct-tissue") == ["ct-tissue: off (configured on; `models reset` undoes)"]
    assert models("on", "stroke") == ["stroke: on (configured paused; `models reset` undoes)"]
    assert effective() == {"ct-tissue": "off", "stroke": "on"}
    assert models("list") == [
        "ok    ct-tissue: built-in; state off (switched at run time; configured on)",
        "FAIL  stroke: no built-in model of this name and no package;"
        " state on (switched at run time; configured paused)",
    ]
    assert models("pause", "ct-tissue") == [
        "ct-tissue: paused (configured on; `models reset` undoes)"
    ]
    assert models("reset", "stroke") == ["stroke: paused, as configured"]
    assert models("reset", "stroke") == ["stroke: paused, as configured (no override was set)"]
    assert effective() == {"ct-tissue": "paused", "stroke": "paused"}
    # Each switch is in the audit trail: what, to which state, and who (never a study).
    trail = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    switched = [e for e in trail if e["event"] == "model-switched"]
    assert [(e["model"], e["state"], e["configured"]) for e in switched] == [
        ("ct-tissue", "off", "on"),
        ("stroke", "on", "paused"),
        ("ct-tissue", "paused", "on"),
        ("stroke", "reset", "paused"),
        ("stroke", "reset", "paused"),
    ]
    assert switched[0]["event_type"]["code"] == "110131"

    typo = cli("models", "off", "ct-tisue", "--config", str(config))
    assert typo.returncode == 1
    assert typo.stderr.strip() == (
        "pacs-agent: no model named 'ct-tisue' in the configuration (models: ct-tissue, stroke)"
    )
    # Without --config the switch would go to some other database and do nothing.
    assert cli("models", "off", "ct-tissue").returncode == 2


def test_version() -> None:
    from agent import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pacs-agent {__version__}"


def test_the_configuration_is_taken_from_the_environment_variable(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port())
    env = {"PACS_AGENT_CONFIG": str(config)}
    checked = cli("check-config", env=env)
    assert checked.stdout.splitlines()[0] == f"ok    configuration: {config}"
    database = tmp_path / "pacs-agent.db"  # beside the file's spool, so from that file
    result = cli("status", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"pacs-agent: no database at sqlite:///{database} (configuration: {config})"
    )
    # --config comes first; a variable naming no file is an error, not the defaults.
    assert cli("status", "--config", str(config), env=env).returncode == 1
    absent = cli("status", env={"PACS_AGENT_CONFIG": str(tmp_path / "absent.toml")})
    assert absent.returncode == 2
    assert absent.stderr.strip() == (
        f"pacs-agent: configuration error: {tmp_path / 'absent.toml'}: cannot read "
        "configuration file: No such file or directory (the file $PACS_AGENT_CONFIG names)"
    )
    # A command acting on the service's database needs a file: the defaults are no service's.
    bare = cli("echo", "pacs0", cwd=tmp_path)
    assert bare.returncode == 2
    assert "`echo` needs a configuration file: give --config, set PACS_AGENT_CONFIG" in bare.stderr
    found = cli("echo", "pacs0", env=env)  # the file is found; it has no destination
    assert found.returncode == 2 and "no destination named 'pacs0'" in found.stderr


def test_read_only_commands_create_nothing_and_say_where_they_looked(tmp_path: Path) -> None:
    here = tmp_path / "empty"
    here.mkdir()
    database = here / "pacs-agent-data" / "pacs-agent.db"
    status = cli("status", cwd=here)
    assert status.returncode == 1
    assert status.stderr.strip() == (
        f"pacs-agent: no database at sqlite:///{database} (configuration: built-in defaults)"
    )
    study = cli("status", "1.2.3.4", cwd=here)
    assert study.returncode == 1 and "no database at" in study.stderr
    models = cli("models", "list", cwd=here)
    assert models.returncode == 0 and models.stdout.startswith("ok    ct-tissue: built-in")
    assert "no database at" in models.stderr and "states as configured" in models.stderr
    rules = cli("rules", "test", str(here), cwd=here)
    assert rules.returncode == 0, rules.stderr
    checked = cli("check-config", cwd=here)
    assert f"ok    database sqlite:///{database}: does not exist yet" in checked.stdout
    assert "ok    spool " in checked.stdout and "does not exist yet" in checked.stdout
    assert list(here.iterdir()) == []


def test_a_database_without_the_agents_tables_is_named_not_filled(
    database_url: str, tmp_path: Path
) -> None:
    from agent.db.existing import display_url

    config = write_config(tmp_path, port=free_port(), database_url=database_url)
    result = cli("status", "--config", str(config))
    assert result.returncode == 1
    shown = display_url(database_url)
    if database_url.startswith("sqlite"):
        assert f"no database at {shown}" in result.stderr
    else:
        assert f"no pacs-agent tables in the database {shown}" in result.stderr
        from sqlalchemy import create_engine, inspect

        engine = create_engine(database_url)
        try:
            assert not inspect(engine).has_table("study")
        finally:
            engine.dispose()


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, port=free_port())
    from agent.db.database import Database
    from agent.settings import load_settings

    db = Database(load_settings(config).database_url)
    db.create_schema()
    db.dispose()
    # As `pacs-agent status | head -0`: the reading end is closed before anything is written.
    with subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(60) == 0
    assert stderr == ""


def test_status_finds_a_study_by_its_uid_or_accession_number_and_never_repeats_them(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from agent.db.database import Database
    from agent.db.values import ArrivedInstance
    from agent.logs import accession_digest
    from agent.settings import load_settings

    config = write_config(tmp_path, port=free_port())
    db = Database(load_settings(config).database_url)
    db.create_schema()
    uid = "1.2.826.0.1.3680043.8.498.77"
    arrival = ArrivedInstance(
        uid,
        uid + ".1",
        uid + ".1.1",
        "1.2.840.10008.5.1.4.1.1.2",
        tmp_path / "x.dcm",
        datetime.now(UTC),
        accession_hash=accession_digest("RAD-0042"),
    )
    [key] = db.record_arrivals([arrival])
    db.dispose()
    for given in (key, key[:8], uid, "RAD-0042"):
        result = cli("status", given, "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == [key, "receiving"]
        assert uid not in result.stdout and "RAD-0042" not in result.stdout
    unknown = cli("status", "RAD-0043", "--config", str(config))
    assert unknown.returncode == 1
    assert "RAD-0043" not in unknown.stderr and "no study has that key" in unknown.stderr


def test_serve_says_in_one_line_what_it_started_and_warns_without_destinations(
    tmp_path: Path,
) -> None:
    from tests.support.agent import AgentProcess

    port = free_port()
    config = write_config(tmp_path, port=port)
    with AgentProcess(config, "serve") as agent:
        agent.wait_log("started: ")
        log = agent.log_path.read_text()
    assert "no [[destinations]] configured: results are kept in the outbox" in log
    [line] = [line for line in log.splitlines() if "started: " in line]
    assert f"started: configuration {config}; receiver PACS_AGENT on 127.0.0.1:{port}, " in line
    assert ", web on 127.0.0.1:" in line
    assert "models ct-tissue on cpu" in line or "models ct-tissue on cuda" in line
    assert line.rstrip().endswith("destinations none")
