"""The README's quick start and worked example, run as written.

The README marks each shell block these tests cover with `<!-- quickstart: NAME -->` right above
it. The blocks run in bash with as little changed as a test machine needs; every change is named
where it is made:

- `sudo apt-get install ...` is not run (no root, no network): the tests need those programs
  already, and skip (fail under CI=true) without them.
- `python3 -m venv .venv && . .venv/bin/activate` runs for real in a temporary folder. For the
  commands after it, the environment these tests run in stands in for that virtual environment:
  its scripts folder (with `pacs-agent`, and pynetdicom's own `storescu` and `echoscu`) comes
  first on PATH, as activation would put it.
- `pip install -c constraints.txt torch==2.13.0 .` runs with `--dry-run --no-index
  --no-build-isolation` added, in the repository: it resolves the README's exact requirements
  against the installed environment, without a download. The CPU-torch line and `bash .ci/run`
  are checked against constraints.txt and the CI script, not run (the first needs the network,
  the second is this test suite).
- `pacs-agent serve` runs in a temporary folder on its defaults; only when something else holds
  the default port 11112 (or 8080) is a config with nothing but that port given instead.
- In the worked example, the test's own Orthanc (tests.support.orthanc) stands in for the Debian
  service: its DICOM port replaces 4242 (its AE title is ORTHANC, as there), and a free port
  replaces 11112. `../shared/data` is a link to the shared test data. The agent's and Orthanc's
  wildcard binds are kept on loopback by the bind shim of tests.support.ports.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support.ci import unavailable
from tests.support.data import REPO_ROOT, SHARED_DATA, dicom_files, shared_data
from tests.support.orthanc import ORTHANC_BINARY, Orthanc
from tests.support.ports import (
    LOOPBACK,
    free_port,
    loopback_env,
    tail,
    wait_until_listening,
)

README = REPO_ROOT / "README.md"
BLOCKS = ("venv", "cpu-torch", "install", "checks", "worked-example")
SECTIONS = ("## Quick start on a fresh machine", "## Worked example: storescu")

VENV_LINE = "python3 -m venv .venv && . .venv/bin/activate"
PIP_LINE = "pip install -c constraints.txt torch==2.13.0 ."
CPU_TORCH_LINE = "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
SERVE_LINE = "pacs-agent serve"
DEFAULT_DICOM_PORT = 11112
DEFAULT_WEB_PORT = 8080

STARTUP = 120.0  # seconds for `pacs-agent serve` to listen (it imports torch) on a 2-core machine
WORKED_EXAMPLE_DEADLINE = 420.0  # the whole worked example, from check-config to `done`


def readme_block(name: str) -> str:
    """The fenced `sh` block right below `<!-- quickstart: NAME -->` in the README."""
    pattern = rf"^<!-- quickstart: {re.escape(name)} -->\n```sh\n(.*?)^```$"
    match = re.search(pattern, README.read_text(), re.MULTILINE | re.DOTALL)
    assert match is not None, f"README.md has no sh block marked <!-- quickstart: {name} -->"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's lines that are not blank and not comments."""
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def section(heading: str) -> str:
    """The README's text from `heading` (a prefix of the line) to the next `## ` heading."""
    text = README.read_text()
    start = text.index("\n" + heading) + 1
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else len(text)]


def constraint(package: str) -> str:
    """The version constraints.txt pins `package` to."""
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt does not pin {package}")


def port_taken(port: int) -> bool:
    """Whether something already listens on (or holds) `port` on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
        return False


def venv_env() -> dict[str, str]:
    """The environment of an activated virtual environment, this test's own standing in for it.

    Nothing else is added: TCP_NODELAY is removed, so that only the README's own setting counts,
    and the loopback bind shim keeps the agent's wildcard bind on 127.0.0.1.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    env = loopback_env()
    env.pop("TCP_NODELAY", None)
    env["PATH"] = f"{scripts}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    if not (scripts / "pacs-agent").is_file():
        unavailable(f"pacs-agent is not installed in {scripts} (pip install -e '.[test]')")
    return env


def stop_group(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """End every process of the session `process` leads (its background jobs too)."""
    pgid = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the leader, so that a finished one no longer counts
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    process.wait()


def test_every_shell_block_of_the_quick_start_is_marked() -> None:
    """Each `sh` block in the two sections carries a marker these tests know."""
    for heading in SECTIONS:
        text = section(heading)
        fences = re.findall(r"^(<!-- quickstart: ([\w-]+) -->\n)?```sh$", text, re.MULTILINE)
        assert fences, heading
        for marker, name in fences:
            assert marker, f"an unmarked sh block under {heading!r}"
            assert name in BLOCKS, name


def test_install_blocks_are_the_ones_this_test_runs() -> None:
    assert commands(readme_block("venv")) == ["sudo apt-get install python3-venv", VENV_LINE]
    assert commands(readme_block("install")) == [PIP_LINE, SERVE_LINE]
    torch = constraint("torch")
    assert f"torch=={torch}" in PIP_LINE
    assert commands(readme_block("cpu-torch")) == [CPU_TORCH_LINE]
    assert f"torch=={torch}" in CPU_TORCH_LINE
    assert commands(readme_block("checks")) == ["bash .ci/run"]
    assert (REPO_ROOT / ".ci" / "run").is_file()


def test_virtualenv_line_makes_a_python_3_11_environment(tmp_path: Path) -> None:
    """The venv line as written, then the Python it activates."""
    check = "import sys; print(sys.prefix); print(sys.version_info >= (3, 11))"
    script = f"{VENV_LINE}\npython -c '{check}'"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    done = subprocess.run(
        ["bash", "-ec", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    prefix, new_enough = done.stdout.split()
    assert Path(prefix) == tmp_path / ".venv"
    assert new_enough == "True", "the README promises Python 3.11 or later"
    assert (tmp_path / ".venv" / "bin" / "pip").is_file()


def test_pip_line_resolves_against_the_constraints() -> None:
    """The README's `pip install`, as a dry run without an index, in the repository."""
    assert PIP_LINE.startswith("pip install ")
    line = PIP_LINE.replace(
        "pip install ", "pip install --dry-run --no-index --no-build-isolation ", 1
    )
    done = subprocess.run(
        ["bash", "-ec", line],
        cwd=REPO_ROOT,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Would install pacs-agent-" in done.stdout


def test_serve_starts_on_its_defaults(tmp_path: Path) -> None:
    """`pacs-agent serve` without a config listens on 11112 and 8080 and keeps its data in
    ./pacs-agent-data."""
    line = SERVE_LINE
    ports = {}
    overrides = []
    for table, default in (("receiver", DEFAULT_DICOM_PORT), ("web", DEFAULT_WEB_PORT)):
        ports[table] = default
        if port_taken(default):
            ports[table] = free_port()
            overrides.append(f"[{table}]\nport = {ports[table]}\n")
    if overrides:
        (tmp_path / "ports.toml").write_text("".join(overrides))
        line += " --config ports.toml"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", "-c", line],
            cwd=tmp_path,
            env=venv_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            for port in ports.values():
                wait_until_listening(
                    port,
                    timeout=STARTUP,
                    alive=lambda: process.poll() is None,
                    describe=lambda: tail(log_path, 40),
                )
            assert (tmp_path / "pacs-agent-data" / "spool").is_dir()
            assert (tmp_path / "pacs-agent-data" / "pacs-agent.db").is_file()
        finally:
            stop_group(process)


@pytest.fixture
def orthanc() -> Iterator[Orthanc]:
    if not ORTHANC_BINARY.is_file():
        unavailable(f"{ORTHANC_BINARY} not found (install the Debian package 'orthanc')")
    with Orthanc() as pacs:
        yield pacs


def worked_example(orthanc: Orthanc, agent_port: int) -> str:
    """The worked example's script with the test's ports (see the module docstring)."""
    lines = readme_block("worked-example").splitlines()
    apt = [line for line in lines if line.startswith("sudo apt-get install ")]
    assert apt == ["sudo apt-get install dcmtk orthanc"]
    script = "\n".join(line for line in lines if line not in apt) + "\n"
    assert orthanc.aet == "ORTHANC"
    script = re.sub(r"\b4242\b", str(orthanc.dicom_port), script)
    script = re.sub(rf"\b{DEFAULT_DICOM_PORT}\b", str(agent_port), script)
    if port_taken(DEFAULT_WEB_PORT):
        script = script.replace("[study]\n", "[web]\nport = 0\n[study]\n", 1)
    return script


def series_by_modality(orthanc: Orthanc, study_uid: str) -> dict[str, list[int]]:
    """For the study in Orthanc: each modality's series, as their instance counts."""
    study_id = orthanc.find_study(study_uid)
    assert study_id is not None, "Orthanc has no such study"
    found: dict[str, list[int]] = {}
    for series in orthanc.get_json(f"/studies/{study_id}/series"):
        modality = str(series["MainDicomTags"].get("Modality", ""))
        found.setdefault(modality, []).append(len(series["Instances"]))
    return found


@pytest.mark.slow
def test_worked_example(orthanc: Orthanc, tmp_path: Path) -> None:
    """storescu -> Orthanc and pacs-agent; the study ends done, and Orthanc holds the CT, the SEG
    and the SR in one study."""
    ct = dicom_files(shared_data("ct-siemens-j2k"))
    for tool in ("storescu", "echoscu"):
        if not Path("/usr/bin", tool).is_file():
            unavailable(f"/usr/bin/{tool} not found (install the Debian package 'dcmtk')")
    env = venv_env()
    clash = shutil.which("storescu", path=env["PATH"])
    assert clash is not None and Path(clash) != Path("/usr/bin/storescu"), (
        "pynetdicom's storescu should come first on PATH here, as in the README's virtualenv"
    )
    work = tmp_path / "pacs-agent"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    script = worked_example(orthanc, free_port())
    log_path = tmp_path / "worked-example.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", "-exc", script],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=WORKED_EXAMPLE_DEADLINE)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(process)
    output = log_path.read_text(errors="replace")
    assert code == 0, f"the worked example ended with {code}:\n{tail(log_path, 80)}"
    status = [line for line in output.splitlines() if re.match(r"^[0-9a-f]{16}  ", line)]
    assert status, tail(log_path, 80)
    assert status[-1].split("  ")[1].startswith("done"), status[-1]

    study_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    found = series_by_modality(orthanc, study_uid)
    assert found.get("CT") == [len(ct)], found
    assert found.get("SEG") == [1], found
    assert found.get("SR") == [1], found
