"""TLS material for a fleet: a private CA, a server certificate and client certificates.

`make_certs(out_dir)` writes PEM files with the `cryptography` library (ECDSA
P-256 keys, SHA-256 signatures):

    ca.pem, ca.key               the certificate authority (keep ca.key offline)
    server.pem, server.key       SAN: 127.0.0.1, localhost and any extra hosts
    client.pem, client.key       for mutual TLS (one per name in `client_names`)

`ServerTls` / `ClientTls` load them into gRPC credentials.  Mutual TLS is
optional: tokens already identify clients; client certificates add a second
factor where the fleet can manage them.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...files import atomic_write

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    """Where `make_certs` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, tuple[Path, Path]]  # name -> (cert, key)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetlearn"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # A new file, created 0600 (O_EXCL: never an existing file, whatever its mode), fsynced and
    # renamed over `path`: the key ends 0600 also where --force replaces a world-readable one,
    # and no one ever reads it half-written or with wider permissions.
    atomic_write(path, data, mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    usage: x509.ObjectIdentifier,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    now = _dt.datetime.now(_dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        b = b.add_extension(_san(hosts), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def make_certs(
    out_dir: str | Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    client_names: Sequence[str] = ("client",),
    days: int = 365,
    overwrite: bool = False,
) -> CertPaths:
    """Create a CA, a server certificate for `hosts` and client certificates in `out_dir`.

    Refuses to overwrite an existing CA unless ``overwrite=True`` (re-creating it
    would silently invalidate every certificate already handed out).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        client_certs={n: (out / f"{n}.pem", out / f"{n}.key") for n in client_names},
    )
    if paths.ca_cert.exists() and not overwrite:
        raise FileExistsError(f"{paths.ca_cert} already exists; pass overwrite=True to replace the CA and every certificate")
    for n in client_names:
        if not n or "/" in n or n in ("ca", "server"):
            raise ValueError(f"bad client certificate name {n!r}")
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fleetlearn CA"))
        .issuer_name(_name("fleetlearn CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)

    server_key = _key()
    server_cert = _issue(hosts[0] if hosts else "fleetlearn server", server_key, ca_cert, ca_key, days, ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    _write_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, server_cert)

    for n, (cert_path, key_path) in paths.client_certs.items():
        k = _key()
        _write_key(key_path, k)
        _write_cert(cert_path, _issue(n, k, ca_cert, ca_key, days, ExtendedKeyUsageOID.CLIENT_AUTH))
    return paths


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key; with `client_ca`, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_dir(cls, cert_dir: str | Path, mutual: bool = False) -> "ServerTls":
        d = Path(cert_dir)
        return cls(d / "server.pem", d / "server.key", d / "ca.pem" if mutual else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.client_ca).read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """The CA that signed the server's certificate; `cert`/`key` for mutual TLS.

    `server_name` overrides the host name checked against the server certificate
    (when the client dials an address that is not in the certificate's SAN).
    """

    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_dir(cls, cert_dir: str | Path, client_name: str | None = "client") -> "ClientTls":
        d = Path(cert_dir)
        if client_name and (d / f"{client_name}.pem").exists():
            return cls(d / "ca.pem", d / f"{client_name}.pem", d / f"{client_name}.key")
        return cls(d / "ca.pem")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes() if self.ca else None,
            private_key=Path(self.key).read_bytes() if self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def certs(out_dir: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), clients: Sequence[str] = ("client",),
          days: int = 365, overwrite: bool = False) -> CertPaths:
    """`fleetlearn certs [--out DIR] [--host H ...] [--client NAME ...] [--days N] [--force]`.

    The server certificate is valid for `hosts` only (by default 127.0.0.1 and localhost):
    clients on other machines dial the server by a name or address that must be among them."""
    return make_certs(out_dir, hosts=tuple(hosts), client_names=tuple(clients), days=days, overwrite=overwrite)
