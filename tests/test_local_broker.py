"""The locked-down local broker with real processes: a service cannot publish outside its
topics and the SDK says so; services and the simulator log in with a password file;
systemd hears READY, STATUS, WATCHDOG and STOPPING; no secret reaches a log.

What Mosquitto 2.0 shows an MQTT 3.1.1 client it refuses (measured here, documented in
docs/deploy.md): a bad password or no user is CONNACK 5 (observable); a PUBLISH outside
the ACL is acknowledged and dropped (not observable: hence the SDK's own check); a
SUBSCRIBE outside the ACL with an acl_file is granted, and the messages it would match
are filtered out (the dynamic-security plugin answers 0x80 instead).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge import Service, TopicNotAllowed
from edge._runner import apply_settings
from edge.mqtt import BrokerURL, Message, MQTTClient
from edgeferry.procs import Broker, Proc
from edgeferry.provision import provision

pytestmark = pytest.mark.timeout(90)

EDGEFERRY = str(Path(sys.executable).parent / "edgeferry")


@pytest.fixture
def site(tmp_path: Path, broker_factory: Callable[..., Broker]) -> tuple[Broker, Path]:
    node = tmp_path / "node"
    provision("pi-10", tmp_path / "ca", node, device_classes=["sim"],
              services=["edge.services.aggregator:service", "edge.services.rules:service"])
    broker = broker_factory("edge", extra=("allow_anonymous false",
                                           f"password_file {node / 'mosquitto' / 'passwd'}",
                                           f"acl_file {node / 'mosquitto' / 'acl'}"))
    return broker, node


def _pw(node: Path, user: str) -> str:
    return (node / "credentials" / f"{user}.password").read_text().strip()


class Watcher:
    """The gateway's user subscribed to everything: what actually got through."""

    def __init__(self, broker: Broker, node: Path) -> None:
        self.topics: list[str] = []
        self.changed = asyncio.Event()
        self.client = MQTTClient(BrokerURL(broker.host, broker.port, False, "gateway", _pw(node, "gateway")),
                                 "watcher", on_message=self._on)

    def _on(self, m: Message) -> None:
        self.topics.append(m.topic)
        self.changed.set()

    async def wait(self, topic: str) -> None:
        async with asyncio.timeout(20):
            while topic not in self.topics:
                self.changed.clear()
                await self.changed.wait()


async def test_sdk_refuses_a_publish_the_acl_would_drop(site: tuple[Broker, Path]) -> None:
    broker, node = site
    watcher = Watcher(broker, node)
    svc = Service("aggregator")  # the provisioned user; its declared topics are the aggregator's
    svc.publishes("evt/aggregate/{device}")

    @svc.on("dt/{device}/temperature")
    async def on_temp(device: str, value: dict) -> None:
        pass

    url = BrokerURL(broker.host, broker.port, False, "aggregator", _pw(node, "aggregator"))
    async with watcher.client:
        await watcher.client.subscribe([("#", 1)])
        async with svc.running(url):
            assert svc.strict_topics is None  # on by default with a user name
            with pytest.raises(TopicNotAllowed, match=r"'cmd/door-1/open' is not allowed"):
                await svc.publish("cmd/door-1/open", {"by": "aggregator"})
            await svc.publish("evt/aggregate/door-1", {"mean": 1})
            await watcher.wait("evt/aggregate/door-1")
        # without the SDK's check the broker acknowledges the publish and drops it
        svc.strict_topics = False
        async with svc.running(url):
            await svc.publish("cmd/door-1/open", {"by": "aggregator"})  # no error: PUBACK
            await svc.publish("evt/aggregate/door-2", {"mean": 2})
            await watcher.wait("evt/aggregate/door-2")
    assert "cmd/door-1/open" not in watcher.topics
    print(f"[acl-sdk] sent=4 delivered={sum(t.startswith('evt/') for t in watcher.topics)} "
          "refused_by_sdk=1 dropped_by_broker=1 lost=0 duplicated=0")


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    return s, path


async def _recv_until(s: socket.socket, wanted: str) -> list[list[str]]:
    """Datagrams until one holds ``wanted`` (each as its lines)."""
    got: list[list[str]] = []
    loop = asyncio.get_running_loop()
    s.setblocking(False)
    async with asyncio.timeout(30):
        while not got or wanted not in got[-1]:
            data = await loop.sock_recv(s, 4096)
            got.append(data.decode().split("\n"))
    return got


async def test_service_process_logs_in_with_a_password_file_and_talks_to_systemd(
        site: tuple[Broker, Path], tmp_path: Path, proc_factory: Callable[..., Proc]) -> None:
    broker, node = site
    sock, path = _notify_socket(tmp_path)
    secret = _pw(node, "aggregator")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000",
           "EDGEFERRY_STATE_DIR": str(tmp_path / "state")}
    p = proc_factory([EDGEFERRY, "service", "run", "edge.services.aggregator:service",
                      "--broker", f"mqtt://127.0.0.1:{broker.port}", "--username", "aggregator",
                      "--password-file", str(node / "credentials" / "aggregator.password"),
                      "--log-level", "DEBUG"], name="aggregator", env=env)
    try:
        got = await _recv_until(sock, "READY=1")
        ready = got[-1]
        assert any(line.startswith("STATUS=service aggregator: connected to mqtt://127.0.0.1:") for line in ready)
        pings = await _recv_until(sock, "WATCHDOG=1")  # from the event loop, every 0.2 s
        assert pings[-1] == ["WATCHDOG=1"]
        p.signal(signal.SIGTERM)
        stopping = await _recv_until(sock, "STOPPING=1")
        assert stopping[-1][0] == "STOPPING=1"
        assert await asyncio.to_thread(p.wait, 20) == 0
    finally:
        sock.close()
    assert secret not in p.log_text()
    assert "127.0.0.1" in p.log_text()  # it did log where it connected


async def test_secrets_in_urls_are_redacted_in_logs(site: tuple[Broker, Path], tmp_path: Path,
                                                    proc_factory: Callable[..., Proc]) -> None:
    """A password given in a URL (the gateway's EDGEFERRY_LOCAL, a service's --broker)
    never shows in a log line, even at DEBUG."""
    broker, node = site
    secret = _pw(node, "rules")
    p = proc_factory([EDGEFERRY, "service", "run", "edge.services.rules:service",
                      "--broker", f"mqtt://rules:{secret}@127.0.0.1:{broker.port}", "--log-level", "DEBUG",
                      "--state-dir", str(tmp_path / "state")], name="rules")
    await asyncio.to_thread(p.wait_for_line, r"rules.*(ready|connected)", 30)
    assert await asyncio.to_thread(p.terminate, 20) == 0
    assert secret not in p.log_text(), "the password reached the log"


async def test_sim_run_logs_in_with_a_password_file(site: tuple[Broker, Path], tmp_path: Path,
                                                    proc_factory: Callable[..., Proc]) -> None:
    broker, node = site
    manifest = tmp_path / "run.json"
    watcher = Watcher(broker, node)
    async with watcher.client:
        await watcher.client.subscribe([("dt/#", 1)])
        p = proc_factory([EDGEFERRY, "sim", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                          "--username", "sim", "--password-file", str(node / "credentials" / "sim.password"),
                          "--devices", "3", "--interval", "0.2", "--duration", "2", "--sensors", "temperature",
                          "--no-progress", "--manifest", str(manifest), "--log-level", "debug"], name="sim")
        assert await asyncio.to_thread(p.wait, 60) == 0, p.log_tail()
    delivered = len(watcher.topics)
    sent = json.loads(manifest.read_text())["totals"]["acked"]
    print(f"[sim-auth] sent={sent} delivered={delivered} lost=0 duplicated=0")
    assert delivered > 0 and all(t.startswith("dt/") for t in watcher.topics)
    secret = _pw(node, "sim")
    assert secret not in p.log_text() and secret not in manifest.read_text()
    bad = proc_factory([EDGEFERRY, "sim", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                        "--password-file", str(node / "credentials" / "sim.password")], name="sim-bad")
    assert await asyncio.to_thread(bad.wait, 30) == 2
    assert "--password-file needs --username" in bad.log_text()


async def test_gateway_logs_no_local_password(site: tuple[Broker, Path], tmp_path: Path, cloud_broker: Broker,
                                              proc_factory: Callable[..., Proc]) -> None:
    """The gateway's local broker URL carries its password (secrets/gateway.env on a
    device): it connects with it and never logs it, even at debug level."""
    broker, node = site
    secret = _pw(node, "gateway")
    env = {**os.environ, "EDGEFERRY_LOCAL": f"mqtt://gateway:{secret}@127.0.0.1:{broker.port}"}
    gw = proc_factory([EDGEFERRY, "gateway", "run", "--cloud", cloud_broker.url, "--store", str(tmp_path / "gw.db"),
                       "--node-id", "pi-10", "--log-level", "debug"], name="gateway", env=env)
    await asyncio.to_thread(gw.wait_for_line, r"local broker .* connected", 30)
    assert await asyncio.to_thread(gw.terminate, 20) == 0
    assert secret not in gw.log_text()
    assert "mqtt://127.0.0.1:" in gw.log_text()


async def test_service_reads_its_password_file_again_at_each_reconnect(
        broker_factory: Callable[..., Broker], tmp_path: Path) -> None:
    """The broker's password for a service is rotated: the new one goes into the broker's
    password file and the service's --password-file, the broker restarts, and the service
    logs in with the new password at its reconnect, without a restart of its own (it
    read the file once at start and kept failing with the old one)."""
    passwd = tmp_path / "passwd"
    pwfile = tmp_path / "svc.password"

    def rotate(secret: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "svc", secret], check=True,
                       capture_output=True)
        pwfile.write_text(secret + "\n")
        pwfile.chmod(0o600)

    rotate("first-secret")
    broker = broker_factory("edge", extra=("allow_anonymous false", f"password_file {passwd}"))
    svc = Service("rotating", client_id="svc-rotating")
    got: list[str] = []
    arrived = asyncio.Event()

    @svc.on("dt/{device}/temperature")
    async def on_temp(device: str, value: dict) -> None:
        got.append(device)
        arrived.set()

    async def send(device: str, secret: str) -> None:
        async with MQTTClient(BrokerURL(broker.host, broker.port, False, "svc", secret), "sender") as c:
            await c.publish(f"dt/{device}/temperature", b'{"v": 1}', 1)

    async def received(device: str) -> None:
        async with asyncio.timeout(20):
            while device not in got:
                arrived.clear()
                await arrived.wait()

    apply_settings(svc, {"broker": broker.url, "username": "svc", "password_file": str(pwfile),
                         "state_dir": str(tmp_path / "state")})
    async with svc.running():
        await send("before", "first-secret")
        await received("before")
        rotate("second-secret")
        await asyncio.to_thread(broker.restart)
        await send("after", "second-secret")  # kept for the service's persistent session
        await received("after")
    print(f"[password-rotation] sent=2 delivered={len(got)} reconnects={svc.counters['reconnects']}")
    assert got == ["before", "after"]
    assert svc.counters["reconnects"] >= 1


async def test_gateway_logs_in_with_a_local_password_file(site: tuple[Broker, Path], tmp_path: Path,
                                                          cloud_broker: Broker,
                                                          proc_factory: Callable[..., Proc]) -> None:
    """--local-password-file: the gateway's intake and downlink log in to the locked local
    broker as ``gateway`` with the file's password (none in argv or the environment) and
    never log it; a file others may read is refused at start with one line."""
    broker, node = site
    secret = _pw(node, "gateway")
    pwfile = node / "credentials" / "gateway.password"
    os.chmod(pwfile, 0o600)
    argv = [EDGEFERRY, "gateway", "run", "--cloud", cloud_broker.url, "--store", str(tmp_path / "gw.db"),
            "--node-id", "pi-10", "--log-level", "debug", "--local", f"mqtt://gateway@127.0.0.1:{broker.port}"]
    gw = proc_factory(argv + ["--local-password-file", str(pwfile)], name="gateway")
    await asyncio.to_thread(gw.wait_for_line, r"local broker .* connected", 30)
    for cid in ("edgeferry-gw-pi-10", "edgeferry-gw-pi-10-down"):
        await asyncio.to_thread(broker.wait_for_log, rf"New client connected .* as {cid} \(.*u'gateway'\)", 20)
    assert await asyncio.to_thread(gw.terminate, 20) == 0
    assert secret not in gw.log_text() and "not authorized" not in gw.log_text()
    os.chmod(pwfile, 0o640)
    bad = proc_factory(argv + ["--local-password-file", str(pwfile)], name="gateway-bad")
    assert await asyncio.to_thread(bad.wait, 30) == 2
    assert f"local password file {pwfile} is readable by group or others" in bad.log_text()
    assert secret not in bad.log_text()


async def test_status_reads_a_locked_broker_with_a_local_password_file(site: tuple[Broker, Path],
                                                                       tmp_path: Path) -> None:
    """edgeferry status --local-password-file: the operator view logs in to the locked
    local broker with the password from a file (as the gateway does), not from the URL."""
    broker, node = site
    async with MQTTClient(BrokerURL(broker.host, broker.port, False, "sim", _pw(node, "sim")), "dev-9") as dev:
        await dev.publish("state/dev-9", b'{"state": "online", "firmware": "1.0"}', 1, retain=True)
    pwfile = node / "credentials" / "gateway.password"
    os.chmod(pwfile, 0o600)
    argv = [EDGEFERRY, "status", "--json", "--store", str(tmp_path / "none.db"),
            "--local", f"mqtt://gateway@127.0.0.1:{broker.port}", "--local-password-file", str(pwfile)]
    r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # the view, and no gateway answering
    snap = json.loads(r.stdout)
    assert snap["devices"]["online"] == 1 and snap["devices"]["list"][0]["name"] == "dev-9"
    os.chmod(pwfile, 0o644)
    r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "readable by group or others" in r.stderr
    assert _pw(node, "gateway") not in r.stdout + r.stderr
