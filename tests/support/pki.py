"""A test certificate authority: a CA, a server and a client certificate, made on the fly."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Pki:
    """PEM files of a test PKI; `other_*` are issued by a CA nobody here trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    server_key_encrypted: Path  # the server key, encrypted with KEY_PASSWORD
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path
    other_server_cert: Path
    other_server_key: Path


def _key() -> rsa.RSAPrivateKey:
    # RSA: every BCP 195 profile's cipher suites (DCMTK's included) take RSA certificates.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey, password: str | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password.encode())
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def _certificate(
    path: Path,
    common_name: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def make_pki(folder: Path) -> Pki:
    """Generate the test PKI's files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key = _key(), _key()
    ca = (_certificate(folder / "ca.pem", "Test CA", ca_key, None), ca_key)
    other = (_certificate(folder / "other-ca.pem", "Other CA", other_ca_key, None), other_ca_key)
    keys = {name: _key() for name in ("server", "client", "other-client", "other-server")}
    _certificate(folder / "server.pem", "localhost", keys["server"], ca, server=True)
    _certificate(folder / "client.pem", "MODALITY", keys["client"], ca, client=True)
    _certificate(folder / "other-client.pem", "MODALITY", keys["other-client"], other, client=True)
    _certificate(folder / "other-server.pem", "localhost", keys["other-server"], other, server=True)
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=_write_key(folder / "server.key", keys["server"]),
        server_key_encrypted=_write_key(
            folder / "server-encrypted.key", keys["server"], KEY_PASSWORD
        ),
        client_cert=folder / "client.pem",
        client_key=_write_key(folder / "client.key", keys["client"]),
        other_ca=folder / "other-ca.pem",
        other_client_cert=folder / "other-client.pem",
        other_client_key=_write_key(folder / "other-client.key", keys["other-client"]),
        other_server_cert=folder / "other-server.pem",
        other_server_key=_write_key(folder / "other-server.key", keys["other-server"]),
    )
