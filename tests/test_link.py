"""Reconnecting without flapping, and refused subscriptions.

- :class:`edge.backoff.Backoff` (full jitter, capped, kept across failures, reset only
  after a connection stayed up) on a fake clock.
- Two processes with one client id on a real Mosquitto (services, and ingest through the
  shared ``connect_retrying``): each connect takes the other's session away, and they must
  not do that at round-trip speed. The broker's log counts the connects.
- A subscription the broker refuses (SUBACK 0x80; Mosquitto's dynamic security plugin
  with tests/brokers/deny-secret.json denies ``secret/#``): the service exits with status
  1 and one line naming the filter, at start and when a reconnect is refused.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edge.backoff import Backoff
from tests.harness import REPO

PY = sys.executable
DYNSEC_PLUGINS = [
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- Backoff


def test_backoff_full_jitter_capped_and_kept_across_failures():
    b = Backoff(0.2, 5.0, random.Random(1))
    ceilings = []
    for _ in range(12):
        ceiling = b.ceiling()
        d = b.next()
        assert 0 <= d <= ceiling
        ceilings.append(ceiling)
    assert ceilings[:6] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    assert set(ceilings[5:]) == {5.0}
    # full jitter: the delays spread over the whole range, not just its upper half
    delays = [Backoff(1.0, 1.0, random.Random(i)).next() for i in range(200)]
    assert min(delays) < 0.1 and max(delays) > 0.9


def test_backoff_resets_only_after_a_connection_stayed_up():
    clock = Clock()
    b = Backoff(0.2, 5.0, random.Random(2), clock=clock)
    assert b.stable == 10.0  # max(10 s, 2 * cap)
    for _ in range(4):
        b.next()
    assert b.ceiling() == 3.2
    # a connection that lasted 9 s does not count: an instance with the same client id
    # (or a broker that closes us right after CONNACK) must not bring back short delays
    b.connected()
    clock.now += 9.0
    b.next()
    assert b.ceiling() == 5.0
    b.connected()
    clock.now += 10.0
    assert b.next() <= 0.2
    assert b.ceiling() == 0.4
    # a failed connect after that is not "up": it keeps growing
    b.next()
    assert b.ceiling() == 0.8
    assert Backoff(1.0, 30.0).stable == 60.0


# ---------------------------------------------------------------- one client id, twice

DUP_SERVICE = textwrap.dedent("""
    from edge import Service

    svc = Service("dup", heartbeat=0)

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        pass
""")


def hold(seconds: float) -> None:
    """Observe for a fixed time (the measurement window, not a synchronisation)."""
    threading.Event().wait(seconds)


def connects(broker, since: int, client_id: str) -> int:
    rx = re.compile(rf"New client connected from \S+ as {re.escape(client_id)} \(")
    return sum(1 for line in broker.log_text().splitlines()[since:] if rx.search(line))


WINDOW = 8.0  # seconds of observation
# Each takeover makes the other instance wait a delay drawn from its own growing backoff
# (0.2, 0.4, ... capped at 5 s, full jitter): about 10 connects per client id in 8 s.
# Reconnecting at once after a drop (the old link) made thousands.
MAX_CONNECTS = 30


def test_two_services_with_one_client_id_do_not_flap(edge_broker, proc_factory, tmp_path):
    (tmp_path / "dup_mod.py").write_text(DUP_SERVICE)
    argv = [PY, "-m", "edgeferry", "service", "run", "dup_mod:svc", "--broker", edge_broker.url,
            "--state-dir", str(tmp_path / "state")]
    a = proc_factory(argv, "dup-a", cwd=tmp_path)
    a.wait_for_line(r"service dup ready", 20)
    mark = edge_broker.mark()
    b = proc_factory(argv, "dup-b", cwd=tmp_path)
    b.wait_for_line(r"service dup ready", 20)
    hold(WINDOW)
    session = connects(edge_broker, mark, "svc-dup")
    publisher = connects(edge_broker, mark, "svc-dup-pub")
    print(f"[one client id, two services] connects in {WINDOW:g} s: session={session} "
          f"publisher={publisher}")
    assert a.running and b.running
    assert 2 <= session <= MAX_CONNECTS, session
    assert 2 <= publisher <= MAX_CONNECTS, publisher
    assert re.search(r"reconnecting in \d+\.\d s", a.log_text() + b.log_text())


def test_two_ingests_with_one_client_id_do_not_flap(cloud_broker, proc_factory, tmp_path):
    """The gateway's and ingest's loops share edge.backoff.connect_retrying: the same."""
    argv = [PY, "-m", "edgeferry", "ingest", "run", "--cloud", cloud_broker.url,
            "--client-id", "ingest-dup", "--backoff-max", "5s"]
    a = proc_factory([*argv, "--sink", f"jsonl:{tmp_path / 'a.jsonl'}"], "ingest-a")
    a.wait_for_line(r"ingest connected", 20)
    mark = cloud_broker.mark()
    b = proc_factory([*argv, "--sink", f"jsonl:{tmp_path / 'b.jsonl'}"], "ingest-b")
    b.wait_for_line(r"ingest connected", 20)
    hold(WINDOW)
    n = connects(cloud_broker, mark, "ingest-dup")
    print(f"[one client id, two ingests] connects in {WINDOW:g} s: {n}")
    assert a.running and b.running
    assert 2 <= n <= MAX_CONNECTS, n


# ---------------------------------------------------------------- refused subscriptions

SECRET_SERVICE = textwrap.dedent("""
    from edge import Service

    svc = Service("snoop", heartbeat=0)

    @svc.on("dt/{device}/x")
    async def telemetry(device: str, data: dict) -> None:
        pass

    @svc.on("secret/{name}")
    async def secret(name: str, data: dict) -> None:
        pass
""")


def dynsec(tmp_path: Path) -> list[str]:
    """Broker config lines loading the dynamic security plugin with a copy of
    tests/brokers/deny-secret.json (the plugin rewrites its file)."""
    plugin = next((p for p in DYNSEC_PLUGINS if Path(p).exists()), None)
    if plugin is None:
        pytest.skip("Mosquitto's dynamic security plugin is not installed")
    conf = tmp_path / "dynsec.json"
    shutil.copy(REPO / "tests" / "brokers" / "deny-secret.json", conf)
    return [f"plugin {plugin}", f"plugin_opt_config_file {conf}"]


def snoop(proc_factory, tmp_path, broker, name):
    (tmp_path / "snoop_mod.py").write_text(SECRET_SERVICE)
    argv = [PY, "-m", "edgeferry", "service", "run", "snoop_mod:svc", "--broker", broker.url,
            "--state-dir", str(tmp_path / "state")]
    return proc_factory(argv, name, cwd=tmp_path)


def error_lines(proc) -> list[str]:
    return [line for line in proc.log_text().splitlines() if line.startswith("error:")]


def test_refused_subscription_at_start_exits_1_naming_the_filter(broker_factory, proc_factory,
                                                                  tmp_path):
    broker = broker_factory("edge", extra=dynsec(tmp_path))
    p = snoop(proc_factory, tmp_path, broker, "snoop")
    rc = p.wait(30)
    lines = error_lines(p)
    print(f"[refused subscription at start] rc={rc} {lines}")
    assert rc == 1
    assert len(lines) == 1 and "'secret/+'" in lines[0] and "refused" in lines[0], p.log_text()
    assert "Traceback" not in p.log_text()


def test_refused_subscription_on_reconnect_exits_1_naming_the_filter(broker_factory, proc_factory,
                                                                      tmp_path):
    broker = broker_factory("edge")
    p = snoop(proc_factory, tmp_path, broker, "snoop")
    p.wait_for_line(r"service snoop ready", 20)
    # the broker comes back with an ACL that denies secret/#
    broker.extra += dynsec(tmp_path)
    broker.restart()
    rc = p.wait(30)
    lines = error_lines(p)
    print(f"[refused subscription on reconnect] rc={rc} {lines}")
    assert rc == 1
    assert len(lines) == 1 and "'secret/+'" in lines[0] and "refused" in lines[0], p.log_text()
    assert "Traceback" not in p.log_text()
