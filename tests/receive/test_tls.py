"""DICOM TLS on the receiver over real sockets: who gets in, who does not, and what is reported.

A throwaway PKI is made per module: a CA, a server certificate for 127.0.0.1 and localhost, a
client certificate, and a second, unrelated CA with its own client and server certificates.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.errors import ConfigError
from agent.settings import DestinationTls, ReceiverTls, SecretRef
from agent.tls import client_context
from tests.support.agent import cli, write_config
from tests.support.data import dicom_files, shared_data
from tests.support.dcmtk import storescu
from tests.support.pki import KEY_PASSWORD, Pki, make_pki
from tests.support.ports import free_port
from tests.support.receiver import Receiver, loopback_settings, minimal_ct


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _receiver_tls(pki: Pki, **overrides: object) -> ReceiverTls:
    values: dict[str, object] = {
        "certificate": pki.server_cert,
        "private_key": pki.server_key,
        "ca_certificates": pki.ca,
        "require_client_certificate": True,
    }
    values.update(overrides)
    return ReceiverTls.model_validate(values)


@pytest.fixture
def receiver(tmp_path: Path, pki: Pki) -> Iterator[Receiver]:
    with Receiver(tmp_path / "spool", loopback_settings(tls=_receiver_tls(pki))) as rx:
        yield rx


def _client_context(
    trust: Path, certificate: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """What a sender would use: the agent's own client context (TLS 1.2+, hostname checked)."""
    tls = DestinationTls(ca_certificates=trust, certificate=certificate, private_key=key)
    return client_context(tls)


def _connect(port: int, ctx: ssl.SSLContext | None) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    tls_args = (ctx, "localhost") if ctx is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT", tls_args=tls_args)
    sock = assoc.dul.socket
    if not assoc.is_established and sock is not None and sock.socket is not None:
        sock.socket.close()  # pynetdicom leaves it open when the peer hung up first
    return assoc


def _wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _refused_at_start(tmp_path: Path, tls: ReceiverTls) -> str:
    with pytest.raises(ConfigError) as info:
        Receiver(tmp_path / "spool", loopback_settings(tls=tls))
    return str(info.value)


def test_echo_and_store_over_tls(receiver: Receiver, pki: Pki) -> None:
    assoc = _connect(receiver.port, _client_context(pki.ca, pki.client_cert, pki.client_key))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(minimal_ct()).Status == 0x0000
    finally:
        assoc.release()
    assert len(receiver.spooled()) == 1 == len(receiver.arrivals)


def test_plaintext_sender_is_refused_and_listener_keeps_serving(
    receiver: Receiver, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.receive.scp"):
        assoc = _connect(receiver.port, None)
        assert not assoc.is_established
        _wait_for(lambda: "TLS handshake with 127.0.0.1 failed" in caplog.text)
    assert receiver.spooled() == []
    good = _connect(receiver.port, _client_context(pki.ca, pki.client_cert, pki.client_key))
    assert good.is_established
    assert good.send_c_echo().Status == 0x0000
    good.release()


def test_missing_client_certificate_is_refused(
    receiver: Receiver, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.receive.scp"):
        assoc = _connect(receiver.port, _client_context(pki.ca))
        assert not assoc.is_established
        # The sender's own log says "certificate required" first; wait for the receiver's line.
        _wait_for(lambda: "TLS handshake with 127.0.0.1 failed" in caplog.text)
    assert "certificate" in caplog.text


def test_client_certificate_of_another_ca_is_refused(receiver: Receiver, pki: Pki) -> None:
    ctx = _client_context(pki.ca, pki.other_client_cert, pki.other_client_key)
    assoc = _connect(receiver.port, ctx)
    assert not assoc.is_established
    assert receiver.spooled() == []


def test_sender_that_does_not_trust_our_ca_gets_nowhere(receiver: Receiver, pki: Pki) -> None:
    ctx = _client_context(pki.other_ca, pki.client_cert, pki.client_key)
    assoc = _connect(receiver.port, ctx)
    assert not assoc.is_established


def test_optional_client_certificate(tmp_path: Path, pki: Pki) -> None:
    """Without require_client_certificate a sender may come without one, not with a bad one."""
    settings = loopback_settings(tls=_receiver_tls(pki, require_client_certificate=False))
    with Receiver(tmp_path / "spool", settings) as receiver:
        anonymous = _connect(receiver.port, _client_context(pki.ca))
        assert anonymous.is_established
        anonymous.release()
        foreign = _connect(
            receiver.port, _client_context(pki.ca, pki.other_client_cert, pki.other_client_key)
        )
        assert not foreign.is_established


def test_tls_1_1_is_refused(receiver: Receiver, pki: Pki) -> None:
    ctx = _client_context(pki.ca, pki.client_cert, pki.client_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old version is the point
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        assoc = _connect(receiver.port, ctx)
    except ssl.SSLError:  # a local OpenSSL policy may refuse to even offer TLS 1.1
        return
    assert not assoc.is_established


def test_silent_connection_does_not_hold_up_others(receiver: Receiver, pki: Pki) -> None:
    """A caller that connects and sends nothing must not stall the accepting thread."""
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5):
        started = time.monotonic()
        assoc = _connect(receiver.port, _client_context(pki.ca, pki.client_cert, pki.client_key))
        assert assoc.is_established
        assoc.release()
        assert time.monotonic() - started < 5


def test_storescu_over_tls(receiver: Receiver, pki: Pki) -> None:
    files = dicom_files(shared_data("dcmqi", "ct-3slice"))
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca)]
    storescu(files, port=receiver.port, called_aet="PACS_AGENT", extra_args=tls)
    assert len(receiver.spooled()) == len(files)
    # Without a client certificate DCMTK is refused as well.
    anonymous = ["+tla", "+cf", str(pki.ca)]
    result = storescu(
        files, port=receiver.port, called_aet="PACS_AGENT", extra_args=anonymous, check=False
    )
    assert result.returncode != 0


def test_encrypted_key_password_is_never_shown(
    tmp_path: Path,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PACS_AGENT_TEST_KEY_PASSWORD", KEY_PASSWORD)
    tls = _receiver_tls(
        pki,
        private_key=pki.server_key_encrypted,
        private_key_password=SecretRef(env="PACS_AGENT_TEST_KEY_PASSWORD"),
    )
    settings = loopback_settings(tls=tls)
    with caplog.at_level(logging.DEBUG), Receiver(tmp_path / "spool", settings) as receiver:
        ctx = _client_context(pki.ca, pki.client_cert, pki.client_key)
        assoc = _connect(receiver.port, ctx)
        assert assoc.is_established
        assoc.release()
    for shown in (caplog.text, repr(settings), str(settings), settings.model_dump_json()):
        assert KEY_PASSWORD not in shown
    assert "PACS_AGENT_TEST_KEY_PASSWORD" in repr(settings)


@pytest.mark.parametrize(
    ("change", "named", "message"),
    [
        ({"certificate": "missing.pem"}, "missing.pem", "cannot read certificate"),
        ({"certificate": "junk.pem"}, "junk.pem", "no PEM certificate"),
        ({"private_key": "junk.pem"}, "junk.pem", "not a PEM private key"),
        ({"private_key": "client.key"}, "client.key", "does not belong to certificate"),
        ({"private_key": "server-encrypted.key"}, "server-encrypted.key", "is encrypted"),
        ({"ca_certificates": "server.key"}, "server.key", "no PEM certificate"),
        ({"ca_certificates": "missing.pem"}, "missing.pem", "cannot read CA certificates"),
    ],
)
def test_unusable_files_are_config_errors_naming_the_file(
    tmp_path: Path, pki: Pki, change: dict[str, str], named: str, message: str
) -> None:
    (pki.ca.parent / "junk.pem").write_text("not a PEM file\n")
    tls = _receiver_tls(pki, **{key: pki.ca.parent / name for key, name in change.items()})
    text = _refused_at_start(tmp_path, tls)
    assert text.startswith("[receiver.tls]")
    assert str(pki.ca.parent / named) in text and message in text


def test_wrong_key_password_is_a_config_error(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_AGENT_TEST_KEY_PASSWORD", "not the password")
    tls = _receiver_tls(
        pki,
        private_key=pki.server_key_encrypted,
        private_key_password=SecretRef(env="PACS_AGENT_TEST_KEY_PASSWORD"),
    )
    text = _refused_at_start(tmp_path, tls)
    assert str(pki.server_key_encrypted) in text
    assert "environment variable PACS_AGENT_TEST_KEY_PASSWORD" in text
    assert "not the password" not in text


def test_serve_with_an_unusable_key_stops_at_start_naming_it(tmp_path: Path, pki: Pki) -> None:
    config = write_config(
        tmp_path,
        port=free_port(),
        extra=(
            f"[receiver.tls]\ncertificate = '{pki.server_cert}'\nprivate_key = '{pki.client_key}'\n"
        ),
    )
    result = cli("serve", "--config", str(config), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"private key {pki.client_key} does not belong to certificate" in result.stderr


def test_check_config_tests_the_receiver_certificate(tmp_path: Path, pki: Pki) -> None:
    tls = f"[receiver.tls]\ncertificate = '{pki.server_cert}'\nprivate_key = '{{key}}'\n"
    good = write_config(tmp_path / "good", port=free_port(), extra=tls.format(key=pki.server_key))
    result = cli("check-config", "--config", str(good))
    assert "ok    receiver TLS certificate, key and CA" in result.stdout, result.stdout
    bad = write_config(tmp_path / "bad", port=free_port(), extra=tls.format(key=pki.client_key))
    result = cli("check-config", "--config", str(bad))
    assert result.returncode == 1
    assert "FAIL  receiver TLS certificate, key and CA" in result.stdout
    assert "does not belong to certificate" in result.stdout
