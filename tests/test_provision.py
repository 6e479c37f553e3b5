"""``edgeferry provision``: the identity checked with cryptography, the broker files with a real Mosquitto."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.errors import ConfigError, ConnectError
from edge.mqtt import BrokerURL, Message, MQTTClient
from edgeferry.procs import Broker
from edgeferry.provision import mosquitto_password_hash, provision

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_chain_cn_key_usage_expiry(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "pi-01"
    r = provision("pi-01", ca_dir, out, devices=["door-1"], device_classes=["sim"], days=90)
    assert r.ca_created and r.cert_issued
    ca, node = _cert(ca_dir / "ca.crt"), _cert(out / "tls" / "node.crt")
    # chain: the node certificate is signed by the fleet CA, which is a CA that signs nothing but leaves
    node.verify_directly_issued_by(ca)
    assert _cert(out / "tls" / "ca.crt") == ca
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    # the node: CN = node id, a client certificate, not a CA
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = node.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.UTC)
    assert node.not_valid_before_utc <= now
    assert dt.timedelta(days=89) < node.not_valid_after_utc - now <= dt.timedelta(days=90)
    # the key belongs to the certificate and is private
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((out / "tls" / "node.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == node.public_key().public_numbers()  # type: ignore[union-attr]
    for secret in [out / "tls" / "node.key", *(out / "balena").iterdir(), ca_dir / "ca.key",
                   *(out / "secrets").iterdir(), *(out / "credentials").iterdir()]:
        assert _mode(secret) == 0o600, secret


def test_ca_key_never_in_the_output(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    provision("pi-02", ca_dir, out, device_classes=["sim"])
    ca_key = (ca_dir / "ca.key").read_bytes()
    body = b"".join(ca_key.splitlines()[1:-1])  # the base64 of the key, wherever it might be copied
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert ca_key not in data and body not in data.replace(b"\n", b""), path
    import base64

    for env in (out / "balena").iterdir():
        assert base64.b64encode(ca_key) not in env.read_bytes()
    with pytest.raises(ConfigError, match="must not contain one another"):
        provision("pi-02", ca_dir, ca_dir / "out")
    with pytest.raises(ConfigError, match="must not contain one another"):
        provision("pi-02", out / "ca", out)


def test_rerun_keeps_and_rotate_renews(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    provision("pi-03", ca_dir, out)
    first = _cert(out / "tls" / "node.crt")
    key1 = (out / "tls" / "node.key").read_bytes()
    pw1 = (out / "credentials" / "gateway.password").read_text()
    again = provision("pi-03", ca_dir, out)
    assert not again.ca_created and not again.cert_issued
    assert _cert(out / "tls" / "node.crt") == first
    assert (out / "credentials" / "gateway.password").read_text() == pw1  # deployed clients keep working
    rotated = provision("pi-03", ca_dir, out, rotate=True)
    assert rotated.cert_issued
    second = _cert(out / "tls" / "node.crt")
    assert second.serial_number != first.serial_number
    assert (out / "tls" / "node.key").read_bytes() != key1
    second.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert (out / "credentials" / "gateway.password").read_text() == pw1


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node id"):
        provision("pi 01/../x", tmp_path / "ca", tmp_path / "out")
    with pytest.raises(ConfigError, match="used twice"):
        provision("pi-04", tmp_path / "ca", tmp_path / "out", devices=["rules"])


def test_password_hash_is_mosquittos_format() -> None:
    h = mosquitto_password_hash("secret", iterations=101, salt=bytes(range(12)))
    kind, iterations, salt, digest = h.split("$")[1:]
    assert (kind, iterations, salt) == ("7", "101", "AAECAwQFBgcICQoL")
    assert len(digest) == 88  # 64 bytes of PBKDF2-SHA512, base64


def test_cli_prints_no_secret(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "edgeferry"
    r = subprocess.run([str(exe), "provision", "--node-id", "pi-05", "--ca-dir", str(tmp_path / "ca"),
                        "--out", str(tmp_path / "out"), "--device-class", "sim"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "issued the certificate of pi-05" in r.stderr
    for pw in (tmp_path / "out" / "credentials").iterdir():
        assert pw.read_text().strip() not in r.stdout + r.stderr
    bad = subprocess.run([str(exe), "provision", "--node-id", "bad id", "--ca-dir", str(tmp_path / "ca"),
                          "--out", str(tmp_path / "o2")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ the local broker


@pytest.fixture
def locked_broker(tmp_path: Path, broker_factory: Callable[..., Broker]) -> tuple[Broker, Path]:
    out = tmp_path / "node"
    provision("pi-06", tmp_path / "ca", out, devices=["door-1"], device_classes=["sim"])
    broker = broker_factory("edge", extra=("allow_anonymous false",
                                           f"password_file {out / 'mosquitto' / 'passwd'}",
                                           f"acl_file {out / 'mosquitto' / 'acl'}"))
    return broker, out


def _url(broker: Broker, out: Path, user: str | None, password: str | None = None) -> BrokerURL:
    if user is not None and password is None:
        password = (out / "credentials" / f"{user}.password").read_text().strip()
    return BrokerURL(broker.host, broker.port, False, user, password)


async def test_only_provisioned_users_connect(locked_broker: tuple[Broker, Path]) -> None:
    broker, out = locked_broker
    for user in ("gateway", "aggregator", "rules", "door-1", "sim"):
        async with MQTTClient(_url(broker, out, user), f"c-{user}"):
            pass
    with pytest.raises(ConnectError, match="not authorized"):
        await MQTTClient(_url(broker, out, "aggregator", "wrong"), "c-wrong").connect()
    with pytest.raises(ConnectError, match="not authorized"):
        await MQTTClient(_url(broker, out, None), "c-anon").connect()


async def test_acl_confines_each_user_to_its_topics(locked_broker: tuple[Broker, Path]) -> None:
    """Mosquitto acknowledges a refused QoS 1 PUBLISH from an MQTT 3.1.1 client and drops
    it: what is observable is that it never arrives. A watcher on '#' (the gateway's user)
    sees, in order, only the allowed publishes; each refused one sits between two allowed
    markers, so its absence is checked without waiting for a timeout."""
    broker, out = locked_broker
    seen: list[str] = []
    done = asyncio.Event()

    def on_message(m: Message) -> None:
        seen.append(m.topic)
        if m.topic == "dt/door-1/end":
            done.set()

    attempts = [  # (user, topic, allowed)
        ("aggregator", "evt/aggregate/d1", True),
        ("aggregator", "cmd/door-1/open", False),
        ("aggregator", "evt/alert/d1", False),  # the rules service's topic
        ("rules", "evt/alert/d1", True),
        ("rules", "dt/door-1/temperature", False),
        ("door-1", "dt/door-1/temperature", True),
        ("door-1", "dt/door-2/temperature", False),
        ("door-1", "evt/alert/door-1", False),
        ("sim", "dt/pump-0001/temperature", True),
        ("sim", "evt/aggregate/pump-0001", False),
        ("sim", "dlq/rules", False),
    ]
    async with MQTTClient(_url(broker, out, "gateway"), "watch", on_message=on_message) as watcher:
        await watcher.subscribe([("#", 1)])
        clients = {u: MQTTClient(_url(broker, out, u), f"c-{u}") for u in {a[0] for a in attempts}}
        for c in clients.values():
            await c.connect()
        for user, topic, _ in attempts:
            await clients[user].publish(topic, b"x", 1)  # acknowledged either way
        await clients["door-1"].publish("dt/door-1/end", b"", 1)
        await asyncio.wait_for(done.wait(), 10)
        for c in clients.values():
            await c.close()
    allowed = [t for _, t, ok in attempts if ok]
    refused = [f"{u} -> {t}" for u, t, ok in attempts if not ok]
    got = [t for t in seen if t != "dt/door-1/end"]
    print(f"[acl] sent={len(attempts)} delivered={len(got)} refused={len(refused)} lost=0 duplicated=0")
    assert got == allowed, f"refused publishes that arrived: {set(got) - set(allowed)}"
    assert len(refused) == 7


def test_password_file_is_read_by_mosquitto_passwd_format(locked_broker: tuple[Broker, Path]) -> None:
    _, out = locked_broker
    lines = (out / "mosquitto" / "passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["gateway", "aggregator", "rules", "door-1", "sim"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in lines)
    assert os.stat(out / "mosquitto" / "passwd").st_mode & 0o007 == 0


def test_gateway_path_does_not_import_cryptography() -> None:
    code = ("import sys, gateway.main, gateway.settings, gateway.gateway, edge.service, edge._runner\n"
            "assert 'cryptography' not in sys.modules, 'cryptography on the gateway path'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_service_with_commands_may_publish_their_statuses(tmp_path: Path) -> None:
    mod = tmp_path / "svc_with_commands.py"
    mod.write_text(
        "from edge import Service\n"
        "service = Service('valve')\n"
        "@service.command('open')\n"
        "async def open_(seconds: int = 1) -> str:\n"
        "    return 'ok'\n"
        "@service.on_desired('valve')\n"
        "async def desired(doc: dict) -> None:\n"
        "    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        r = provision("pi-09", tmp_path / "ca", tmp_path / "out", services=["svc_with_commands:service"])
    finally:
        sys.path.remove(str(tmp_path))
    (valve,) = [u for u in r.users if u.name == "valve"]
    assert "cmd/valve/+" in valve.read and "shadow/valve/desired" in valve.read
    assert "evt/cmd/valve" in valve.write and "shadow/valve/reported" in valve.write


def test_node_yaml_is_a_valid_gateway_config(tmp_path: Path) -> None:
    """node.yaml parses with the gateway's own settings (unknown keys and unusable TLS
    files are refused there); with etc= the output directory the file paths are real."""
    from gateway.settings import gateway_settings

    out = tmp_path / "out"
    provision("pi-12", tmp_path / "ca", out, cloud="mqtts://cloud.example:8883", etc=str(out))
    s = gateway_settings(["--config", str(out / "node.yaml")], environ={})
    assert (s.node_id, s.cloud) == ("pi-12", "mqtts://cloud.example:8883")
    assert s.cert_file == str(out / "tls" / "node.crt") and s.key_file == str(out / "tls" / "node.key")
    assert s.store == "/var/lib/edgeferry-gateway/store.db"
