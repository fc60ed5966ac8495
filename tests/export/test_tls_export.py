"""C-STORE and C-ECHO to a DICOM TLS peer: success, and clear failures naming the destination."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from agent.errors import ConfigError, RetryableError
from agent.export import dimse
from agent.settings import DestinationSettings, DestinationTls
from tests.support.agent import cli
from tests.support.pki import Pki, make_pki
from tests.support.ports import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Peer:
    """A pynetdicom Storage SCP on 127.0.0.1, over TLS when given a context."""

    ae_title = "TLS_PACS"

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.received: list[Dataset] = []
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            ssl_context=ctx,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )
        assert isinstance(server, ThreadedAssociationServer)
        self.server = server
        self.port: int = server.server_address[1]

    def _store(self, event: Event) -> int:
        self.received.append(event.dataset)
        return 0x0000


def _server_context(pki: Pki, *, require_client_certificate: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(cafile=pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def _serve(ctx: ssl.SSLContext | None) -> Iterator[Peer]:
    peer = Peer(ctx)
    try:
        yield peer
    finally:
        peer.server.shutdown()


@pytest.fixture
def peer(pki: Pki) -> Iterator[Peer]:
    yield from _serve(_server_context(pki))


def _destination(port: int, **tls: object) -> DestinationSettings:
    return DestinationSettings(
        name="pacs",
        ae_title=Peer.ae_title,
        host="127.0.0.1",
        port=port,
        tls=DestinationTls.model_validate(tls),
    )


def _mutual(pki: Pki, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "ca_certificates": pki.ca,
        "certificate": pki.client_cert,
        "private_key": pki.client_key,
    }
    values.update(overrides)
    return values


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_echo_and_send_over_tls(peer: Peer, pki: Pki, ct_file: Path) -> None:
    destination = _destination(peer.port, **_mutual(pki))
    dimse.echo(destination, "PACS_AGENT")
    dimse.send(destination, "PACS_AGENT", [ct_file], [].append)
    assert [str(ds.SOPClassUID) for ds in peer.received] == [CTImageStorage]


def test_wrong_ca_fails_naming_the_destination(peer: Peer, pki: Pki, ct_file: Path) -> None:
    destination = _destination(peer.port, **_mutual(pki, ca_certificates=pki.other_ca))
    with pytest.raises(RetryableError) as info:
        dimse.echo(destination, "PACS_AGENT")
    assert str(info.value).startswith("destination pacs: TLS error: certificate verify failed")
    with pytest.raises(RetryableError, match=r"^destination pacs: TLS error: certificate"):
        dimse.send(destination, "PACS_AGENT", [ct_file], [].append)
    assert peer.received == []


def test_host_name_is_checked_unless_told_not_to(peer: Peer, pki: Pki) -> None:
    wrong_name = _destination(peer.port, **_mutual(pki, server_name="pacs.example"))
    with pytest.raises(RetryableError, match="Hostname mismatch"):
        dimse.echo(wrong_name, "PACS_AGENT")
    unchecked = _destination(
        peer.port, **_mutual(pki, server_name="pacs.example", verify_hostname=False)
    )
    dimse.echo(unchecked, "PACS_AGENT")


def test_peer_wanting_a_client_certificate_we_lack(peer: Peer, pki: Pki) -> None:
    destination = _destination(peer.port, ca_certificates=pki.ca)
    with pytest.raises(RetryableError) as info:
        dimse.echo(destination, "PACS_AGENT")
    assert str(info.value).startswith("destination pacs: TLS error:")
    assert "certificate" in str(info.value)


def test_nothing_listening_is_connection_refused_not_a_tls_error(pki: Pki) -> None:
    port = free_port()
    with pytest.raises(RetryableError) as info:
        dimse.echo(_destination(port, **_mutual(pki)), "PACS_AGENT")
    assert str(info.value) == f"destination pacs: connection refused at 127.0.0.1:{port}"


def test_peer_not_speaking_tls(pki: Pki) -> None:
    for plain in _serve(None):
        with pytest.raises(RetryableError, match=r"^destination pacs: TLS error: "):
            dimse.echo(_destination(plain.port, **_mutual(pki)), "PACS_AGENT")
        # The same peer without TLS is fine: the failure was the TLS, not the peer.
        dimse.echo(
            DestinationSettings(
                name="pacs", ae_title=Peer.ae_title, host="127.0.0.1", port=plain.port
            ),
            "PACS_AGENT",
        )


def test_our_certificate_from_another_ca_is_refused(peer: Peer, pki: Pki) -> None:
    destination = _destination(
        peer.port,
        **_mutual(pki, certificate=pki.other_client_cert, private_key=pki.other_client_key),
    )
    with pytest.raises(RetryableError, match=r"^destination pacs: TLS error: .*unknown ca"):
        dimse.echo(destination, "PACS_AGENT")


def test_unusable_tls_file_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    destination = _destination(1, ca_certificates=missing)
    with pytest.raises(ConfigError) as info:
        dimse.echo(destination, "PACS_AGENT")
    assert str(info.value) == (
        f"destination pacs: TLS: cannot read CA certificates {missing}: No such file or directory"
    )


def test_check_config_and_echo_commands(peer: Peer, pki: Pki, tmp_path: Path) -> None:
    """Paths are relative to the file; an unusable file is one line naming it."""
    folder = tmp_path / "config"
    (folder / "tls").mkdir(parents=True)
    for name, source in (
        ("ca.pem", pki.ca),
        ("client.pem", pki.client_cert),
        ("client.key", pki.client_key),
    ):
        (folder / "tls" / name).write_bytes(source.read_bytes())
    config = folder / "agent.toml"
    config.write_text(
        "[receiver]\nport = 0\n[spool]\npath = 'spool'\n"
        "[[destinations]]\n"
        f"name = 'pacs'\nae_title = '{Peer.ae_title}'\nhost = '127.0.0.1'\nport = {peer.port}\n"
        "tls = { ca_certificates = 'tls/ca.pem', certificate = 'tls/client.pem', "
        "private_key = 'tls/client.key' }\n"
        "[[destinations]]\n"
        f"name = 'broken'\nae_title = '{Peer.ae_title}'\nhost = '127.0.0.1'\nport = {peer.port}\n"
        "tls = { ca_certificates = 'tls/missing.pem' }\n"
    )
    result = cli("check-config", "--config", str(config))
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("ok    destination pacs ") for line in lines), result.stdout
    broken = [line for line in lines if line.startswith("FAIL  destination broken ")]
    assert len(broken) == 1
    assert f"cannot read CA certificates {folder / 'tls' / 'missing.pem'}" in broken[0]
    echo = cli("echo", "--config", str(config), "pacs")
    assert echo.returncode == 0 and "success" in echo.stdout, echo.stderr
