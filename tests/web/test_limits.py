"""The web port's bounds over real sockets on 127.0.0.1: connections held, header and body time,
and the receiver still answering C-ECHO and C-STORE while the web port is flooded."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.connections import close_connection
from agent.settings import Settings
from agent.web.limits import Descriptors, connection_cap
from tests.support.agent import AgentProcess, write_config
from tests.support.pki import make_pki
from tests.support.ports import free_port
from tests.support.receiver import minimal_ct
from tests.support.web import (
    CONTENT_TYPE,
    TOKEN,
    WebAgent,
    new_boundary,
    session,
    web_settings,
)

HALF_SENT = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
WAIT_SECONDS = 30.0  # how long a test waits for what must happen; never asserted as a time


def _half_sent(port: int, count: int) -> list[socket.socket]:
    """`count` connections, each with a request whose headers never end."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
        with contextlib.suppress(OSError):  # one closed already for a newer one is fine
            sock.sendall(HALF_SENT)
        socks.append(sock)
    return socks


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sent before closing the connection (it must close it)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


@contextlib.contextmanager
def _closing(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _health(url: str) -> requests.Response:
    return session(None).get(f"{url}/api/health", timeout=WAIT_SECONDS)


def test_a_tls_handshake_never_sent_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    """Before, asyncio gave a client 60 s to start its TLS handshake, before the connection
    reached the limits at all: now it has the header timeout. (The test waits 30 s at most.)"""
    pki = make_pki(tmp_path / "pki")
    tls = {"certificate": pki.server_cert, "private_key": pki.server_key}
    web = web_settings(tmp_path, tls=tls, header_timeout_seconds=0.5)
    with WebAgent(tmp_path, web) as agent:
        silent = socket.create_connection(("127.0.0.1", agent.server.port), timeout=WAIT_SECONDS)
        with _closing([silent]):
            assert _closed_by_server(silent) == b""  # closed, not timed out on our side


def test_half_sent_request_is_answered_408_and_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    web = web_settings(tmp_path, header_timeout_seconds=0.5)
    with WebAgent(tmp_path, web) as agent, _closing(_half_sent(agent.server.port, 3)) as socks:
        for sock in socks:
            assert _closed_by_server(sock).startswith(b"HTTP/1.1 408 ")
        assert _health(agent.url).status_code == 200


def test_connections_past_the_limit_replace_half_sent_ones_and_health_answers(
    tmp_path: Path,
) -> None:
    web = web_settings(tmp_path, max_connections=8, header_timeout_seconds=60)
    with WebAgent(tmp_path, web) as agent, _closing(_half_sent(agent.server.port, 40)) as socks:
        assert _health(agent.url).status_code == 200
        # The oldest half-sent ones were closed to make room; no more than the limit is held.
        closed = 0
        for sock in socks[:30]:
            sock.settimeout(WAIT_SECONDS)
            _closed_by_server(sock)
            closed += 1
        assert closed == 30
        assert len(agent.server.connections()) <= 8


def test_a_stalled_upload_is_closed_after_the_body_timeout(tmp_path: Path) -> None:
    web = web_settings(tmp_path, body_timeout_seconds=0.5)
    boundary = new_boundary()
    head = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {CONTENT_TYPE.format(boundary=boundary)}\r\n"
        "Content-Length: 100000\r\n\r\n"
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nDICM"
    ).encode()
    with WebAgent(tmp_path, web) as agent:
        with socket.create_connection(("127.0.0.1", agent.server.port), WAIT_SECONDS) as sock:
            sock.sendall(head)
            _closed_by_server(sock)
        deadline = time.monotonic() + WAIT_SECONDS
        while agent.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.leftovers() == [] and agent.spooled() == []


def test_web_share_of_descriptors_leaves_the_receivers() -> None:
    settings = Settings()
    assert connection_cap(settings, Descriptors(limit=65536, in_use=40)) == 64
    small = connection_cap(settings, Descriptors(limit=256, in_use=40))
    assert 1 <= small < 64
    # What the web port may take still leaves the receiver its associations and headroom.
    assert 40 + small * 2 + settings.receiver.max_associations * 3 + 64 <= 256
    assert connection_cap(settings, Descriptors(limit=64, in_use=60)) == 1


class _LimitedAgent(AgentProcess):
    """`pacs-agent serve` with RLIMIT_NOFILE lowered to `nofile`, soft and hard."""

    nofile = 256

    def start(self) -> None:
        command = [sys.executable, "-m", "agent.cli", self.role, "--config", str(self.config)]
        limit = f"--nofile={self.nofile}:{self.nofile}"
        self.spawn(["prlimit", limit, "--", *command])


def _echo(port: int) -> int:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    try:
        assert assoc.is_established
        status = int(assoc.send_c_echo().Status)
        assoc.release()
    finally:
        close_connection(assoc)
    return status


def _store(port: int) -> int:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    try:
        assert assoc.is_established
        status = int(assoc.send_c_store(minimal_ct()).Status)
        assoc.release()
    finally:
        close_connection(assoc)
    return status


_FLOOD = f"""
import socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
    try:
        sock.sendall({HALF_SENT!r})
    except OSError:
        pass
    socks.append(sock)
print("flooding", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _flood(port: int, count: int) -> Iterator[None]:
    """`count` half-sent requests held open by another process (this one's pynetdicom uses
    select(), which cannot wait on descriptors numbered past 1,024)."""
    command = [sys.executable, "-c", _FLOOD, str(port), str(count)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as flood:
        assert flood.stdout is not None and flood.stdin is not None
        try:
            assert flood.stdout.readline() == b"flooding\n"
            yield
        finally:
            flood.stdin.close()
            flood.wait(WAIT_SECONDS)


def test_flood_of_half_sent_requests_leaves_dicom_and_health_answering(tmp_path: Path) -> None:
    """More half-sent requests than the process has descriptors (the issue's case: 1,100 with
    1,024): C-ECHO, C-STORE and health still answer, and the log stays small."""
    port, web_port = free_port(), free_port()
    extra = f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n'
    config = write_config(tmp_path, port=port, extra=extra)
    with _LimitedAgent(config, "serve") as agent:
        agent.wait_listening(port)
        agent.wait_listening(web_port)
        agent.wait_log("web port listening")
        before = agent.log_path.stat().st_size
        with _flood(web_port, _LimitedAgent.nofile + 44):
            assert _echo(port) == 0x0000
            assert _store(port) == 0x0000
            assert _health(f"http://127.0.0.1:{web_port}").status_code == 200
            agent.assert_running()
        agent.assert_running()
        assert "Too many open files" not in agent.log_path.read_text(errors="replace")
        assert agent.log_path.stat().st_size - before < 16 * 1024, agent.log_tail(40)


@pytest.mark.parametrize("max_connections", [1, 4])
def test_health_answers_at_any_limit(tmp_path: Path, max_connections: int) -> None:
    web = web_settings(tmp_path, max_connections=max_connections)
    with WebAgent(tmp_path, web) as agent, _closing(_half_sent(agent.server.port, 10)):
        assert _health(agent.url).json()["status"] == "ok"


def test_shipped_units_raise_the_descriptor_limit() -> None:
    units = sorted((Path(__file__).parents[2] / "deploy" / "systemd").glob("*.service"))
    assert units
    for unit in units:
        assert "\nLimitNOFILE=65536\n" in unit.read_text(), unit.name
