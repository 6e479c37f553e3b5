"""``edgeferry provision``: one device's identity and its local broker's credentials.

What it writes into ``--out`` (ready to copy onto a device with ``deploy/install.sh
--provisioned DIR``, or to load as balena service variables from ``balena/``)::

    node.yaml                 the gateway's settings for this node (node_id, cloud, TLS files)
    tls/ca.crt                the fleet CA certificate (public)
    tls/node.crt              the node's client certificate, CN = node id, signed by the CA
    tls/node.key              its private key (0600)
    mosquitto/passwd          the local broker's password file (PBKDF2-SHA512, ``$7$``)
    mosquitto/acl             which topics each user may read and write
    credentials/USER.password one password per broker user (0600; kept across runs; a
                              service or the simulator reads it with --password-file)
    secrets/gateway.env       EDGEFERRY_LOCAL with the gateway's user (its password is
                              credentials/gateway.password, --local-password-file)
    balena/SERVICE.env        the same as balena service variables, one file per
                              service of docker-compose.yml (0600)

The fleet CA lives in ``--ca-dir`` (created on first use; ``ca.key`` mode 0600), never
in the output. Running again keeps the node key, the certificate while it is valid for
more than 30 days, and every password; ``--rotate`` renews the key and certificate.

``cryptography`` is imported here only, lazily: the gateway never needs it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError

__all__ = ["ProvisionResult", "mosquitto_password_hash", "provision", "render_acl"]

PBKDF2_ITERATIONS = 1000  # per CONNECT on the device; mosquitto_passwd's default is 101
RENEW_BEFORE = dt.timedelta(days=30)
GATEWAY_USER = "gateway"


@dataclass(frozen=True)
class BrokerUser:
    """A user of the local broker and the topics it may use (MQTT filters)."""

    name: str
    kind: str  # gateway, service, device, device-class
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    readwrite: tuple[str, ...] = ()


@dataclass
class ProvisionResult:
    out: Path
    ca_created: bool
    cert_issued: bool
    not_after: dt.datetime
    users: list[BrokerUser] = field(default_factory=list)


def mosquitto_password_hash(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """Mosquitto 2's password file hash: ``$7$ITERATIONS$SALT$HASH`` with PBKDF2-HMAC-SHA512
    over the raw 12-byte salt, both base64 (what ``mosquitto_passwd`` writes)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def render_acl(users: list[BrokerUser]) -> str:
    lines = ["# Local broker ACL written by `edgeferry provision` (docs/deploy.md).",
             "# Anonymous clients get nothing (allow_anonymous false); each user only its topics.", ""]
    for u in users:
        lines.append(f"# {u.kind}")
        lines.append(f"user {u.name}")
        lines += [f"topic read {t}" for t in u.read]
        lines += [f"topic write {t}" for t in u.write]
        lines += [f"topic readwrite {t}" for t in u.readwrite]
        lines.append("")
    return "\n".join(lines)


def service_user(spec: str) -> BrokerUser:
    """A service may read what its handlers consume and write what it declares: the same
    lists the SDK checks its publishes against (edge/_acl.py)."""
    from edge._acl import read_filters, write_filters
    from edge._launch import load_target

    svc = load_target(spec)
    return BrokerUser(svc.name, "service", read=tuple(read_filters(svc)), write=tuple(write_filters(svc)))


def device_user(name: str) -> BrokerUser:
    """One device: its telemetry, its state (retained birth and last will), the statuses
    and replies of its commands, its OTA events, its commands and its shadow; nothing else."""
    return BrokerUser(name, "device", write=(f"dt/{name}/#", f"state/{name}", f"evt/cmd/{name}", f"evt/ota/{name}"),
                      read=(f"cmd/{name}/#",), readwrite=(f"shadow/{name}/#",))


def device_class_user(name: str) -> BrokerUser:
    """A credential shared by a class of devices (e.g. a simulated fleet): any device's
    telemetry, state, command statuses, OTA events, commands and shadow; never a
    service's events (evt/aggregate/, evt/alert/), commands to others, or dlq/."""
    return BrokerUser(name, "device-class", write=("dt/+/#", "state/+", "evt/cmd/+", "evt/ota/+"),
                      read=("cmd/+/#",), readwrite=("shadow/+/#",))


def gateway_user() -> BrokerUser:
    """The gateway is the site's bridge: it reads every uplink filter (configurable, so all
    topics) and delivers commands and desired state to any device or service."""
    return BrokerUser(GATEWAY_USER, "gateway", readwrite=("#",))


def _check_name(value: str, what: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ConfigError(f"{what} {value!r} must be letters, digits, _ . - (at most 64)")
    return value


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (a secret is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _password(out: Path, user: str) -> str:
    path = out / "credentials" / f"{user}.password"
    if path.exists():
        existing = path.read_text().strip()
        if existing:
            return existing
    pw = secrets.token_urlsafe(24)
    _write(path, pw + "\n", 0o600)
    return pw


# ------------------------------------------------------------------------------ X.509


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ensure_ca(ca_dir: Path, days: int) -> tuple[Any, Any, bool]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, crt_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if key_path.exists() and crt_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate(crt_path.read_bytes()), False
    if key_path.exists() or crt_path.exists():
        raise ConfigError(f"{ca_dir} holds only one of ca.key and ca.crt; restore the other or use an empty directory")
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeferry"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "edgeferry fleet CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert, True


def _issue(ca_key: Any, ca_cert: Any, node_id: str, tls: Path, days: int, rotate: bool) -> tuple[bool, dt.datetime]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key_path, crt_path = tls / "node.key", tls / "node.crt"
    if not rotate and key_path.exists() and crt_path.exists():
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        same_ca = cert.issuer == ca_cert.subject
        if (cn and cn[0].value == node_id and same_ca
                and cert.not_valid_after_utc - _now() > RENEW_BEFORE):
            return False, cert.not_valid_after_utc
    key: Any
    if rotate or not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    else:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeferry"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(tls / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True, cert.not_valid_after_utc


# ------------------------------------------------------------------------------ provision


def provision(
    node_id: str,
    ca_dir: Path,
    out: Path,
    *,
    rotate: bool = False,
    services: list[str] | None = None,
    devices: Sequence[str] = (),
    device_classes: Sequence[str] = (),
    cloud: str | None = None,
    days: int = 365,
    ca_days: int = 3650,
    local: str = "127.0.0.1:1883",
    etc: str = "/etc/edgeferry",
) -> ProvisionResult:
    """Write the node's identity and its local broker's credentials into ``out``."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError("provisioning needs the cryptography package: pip install 'edgeferry[provision]'") from None
    _check_name(node_id, "node id")
    ca_dir, out = Path(ca_dir).resolve(), Path(out).resolve()
    if ca_dir == out or out in ca_dir.parents or ca_dir in out.parents:
        raise ConfigError(f"--ca-dir {ca_dir} and --out {out} must not contain one another: "
                          "the CA key never goes into a device's files")
    if cloud is not None:
        from edge.mqtt import parse_url

        parse_url(cloud)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_created = _ensure_ca(ca_dir, ca_days)
    issued, not_after = _issue(ca_key, ca_cert, node_id, out / "tls", days, rotate)

    from edgeferry.catalog import BUILTINS

    users = [gateway_user()]
    users += [service_user(spec) for spec in (BUILTINS if services is None else services)]
    users += [device_user(_check_name(d, "device")) for d in devices]
    users += [device_class_user(_check_name(c, "device class")) for c in device_classes]
    names = [u.name for u in users]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"broker user name(s) used twice: {', '.join(dup)} (a device named like a service?)")

    passwords = {u.name: _password(out, u.name) for u in users}
    _write(out / "mosquitto" / "passwd",
           "".join(f"{n}:{mosquitto_password_hash(p)}\n" for n, p in passwords.items()), 0o640)
    _write(out / "mosquitto" / "acl", render_acl(users), 0o644)

    secrets_dir = out / "secrets"
    # the user name only: the password is credentials/gateway.password (--local-password-file)
    _write(secrets_dir / "gateway.env", f"EDGEFERRY_LOCAL=mqtt://{GATEWAY_USER}@{local}\n", 0o600)

    node_yaml = [
        f"# edgeferry settings of node {node_id}, written by `edgeferry provision`.",
        f"# Installed as {etc}/gateway.yaml; the local broker's user is in secrets/gateway.env.",
        f"node_id: {node_id}",
        "gateway:",
        f"  cloud: {cloud or 'mqtts://cloud.example:8883   # set the cloud broker URL'}",
        "  store: /var/lib/edgeferry-gateway/store.db",
        f"  ca_file: {etc}/tls/ca.crt          # the cloud broker's CA (replace if it is not the fleet CA)",
        f"  cert_file: {etc}/tls/node.crt",
        f"  key_file: {etc}/tls/node.key",
        "",
    ]
    _write(out / "node.yaml", "\n".join(node_yaml), 0o644)

    tls = out / "tls"

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    def var(u: BrokerUser) -> str:
        return f"EDGEFERRY_{u.name.upper().replace('-', '_').replace('.', '_')}_PASSWORD"

    # balena service variables, one file per service of docker-compose.yml: each container
    # sees only its own secrets (docs/deploy.md has the loop that sets them)
    per_service = {
        "mosquitto": [f"EDGEFERRY_BROKER_PASSWD_B64={b64(out / 'mosquitto' / 'passwd')}",
                      f"EDGEFERRY_BROKER_ACL_B64={b64(out / 'mosquitto' / 'acl')}"],
        "gateway": [f"EDGEFERRY_NODE_ID={node_id}",
                    f"EDGEFERRY_TLS_CERT_B64={b64(tls / 'node.crt')}",
                    f"EDGEFERRY_TLS_KEY_B64={b64(tls / 'node.key')}",
                    f"EDGEFERRY_TLS_CA_B64={b64(tls / 'ca.crt')}",
                    f"EDGEFERRY_GATEWAY_PASSWORD={passwords[GATEWAY_USER]}"],
    }
    for u in users:
        if u.kind in ("service", "device-class"):
            per_service[u.name] = [f"EDGEFERRY_NODE_ID={node_id}", f"{var(u)}={passwords[u.name]}"]
    for service, lines in per_service.items():
        head = [f"# balena service variables of '{service}' on node {node_id}: secrets, keep them out of",
                f"# version control. balena env set NAME VALUE --device UUID --service {service}"]
        _write(out / "balena" / f"{service}.env", "\n".join(head + lines) + "\n", 0o600)
    return ProvisionResult(out, ca_created, issued, not_after, users)
