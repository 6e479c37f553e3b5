"""Certificates made in the test with the ``cryptography`` package: CAs, server and client
certificates (valid, expired, for another name), written as PEM files.

Mosquitto started as root reads its files as user ``mosquitto`` unless told otherwise:
the directory made here is world-readable (0755) and so are the *broker's* files; a
client key is written 0600, as the gateway requires.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "Issued", "tls_dir"]

_NOW = dt.datetime.now(dt.UTC)


def tls_dir(base: Path) -> Path:
    d = base / "tls"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    os.chmod(d, 0o755)
    return d


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path, key_mode: int = 0o600) -> tuple[str, str]:
        """Write both files (replacing them atomically, as a rotation would)."""
        for path, data, mode in ((cert_path, self.cert_pem(), 0o644),
                                 (key_path, self.key_pem(), key_mode)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        return str(cert_path), str(key_path)


class CA(Issued):
    """A self-signed certificate authority that issues server and client certificates."""

    def __init__(self, name: str = "edgeferry test CA") -> None:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - dt.timedelta(days=1))
            .not_valid_after(_NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        super().__init__(cert, key)

    def write_ca(self, path: Path) -> str:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.cert_pem())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return str(path)

    def issue(self, cn: str, *, server: bool = False, names: tuple[str, ...] = (),
              expired: bool = False) -> Issued:
        """A certificate for ``cn``: a server's carries ``names`` (DNS names or IP
        addresses) as subjectAltName; ``expired`` ended yesterday."""
        key = _key()
        if expired:
            start, end = _NOW - dt.timedelta(days=10), _NOW - dt.timedelta(days=1)
        else:
            start, end = _NOW - dt.timedelta(hours=1), _NOW + dt.timedelta(days=7)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if names:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return Issued(b.sign(self.key, hashes.SHA256()), key)
