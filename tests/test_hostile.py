"""The gateway, ingest and a service against a hostile broker (tests/hostile_broker.py).

Each runs as a process, its broker reached through a :class:`SwitchProxy` in front of a
real Mosquitto. Mid-run the proxy switches to the hostile broker, which plays every
malformed-packet scenario once (one per connection: the process must reconnect after
each), then back to the real broker. What is checked:

- each violation is noticed: the process closes the connection within ``PROMPT`` seconds
  of the bad packet (the slow trickle, which never completes a packet, within the
  keepalive bound), and logs it;
- it reconnects each time (with backoff) and keeps running;
- its peak RSS stays under ``RSS_BOUND_MIB`` (a 268,435,455-byte declared length is not
  allocated or buffered);
- nothing is lost or duplicated at the sink across the switch.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.testing import TestClient
from tests.harness import wait_until
from tests.hostile_broker import SCENARIOS, Background, HostileBroker, Served, SwitchProxy
from tests.pipeline import Pipeline

PY = sys.executable
PROMPT = 2.0  # seconds from a malformed packet to the client closing the connection
RSS_BOUND_MIB = 100.0
KEEPALIVE = 4.0  # seconds, for the processes under test
# the slow trickle completes no packet: only the keepalive bound (1.25 x) notices it
TRICKLE_BOUND = KEEPALIVE * 1.25 + PROMPT
VIOLATION = re.compile(r"(?i)protocol error|malformed|exceeds|no answer .* within|keepalive")


class Hostile:
    """A hostile broker and a switch proxy on a background loop."""

    def __init__(self, real: Any) -> None:
        self.bg = Background()
        self.broker = self.bg.call(HostileBroker(linger=TRICKLE_BOUND + 10).start())
        self.proxy = self.bg.call(SwitchProxy(
            {"real": (real.host, real.port), "hostile": ("127.0.0.1", self.broker.port)}, "real").start())
        self.port = self.proxy.port
        self.url = f"mqtt://127.0.0.1:{self.proxy.port}"

    def switch(self, name: str) -> None:
        self.bg.call(self.proxy.switch(name))

    def played(self, client_id: str) -> list[Served]:
        return self.broker.played(client_id)[: len(SCENARIOS)]

    def played_all(self, client_id: str) -> bool:
        s = self.played(client_id)
        return len(s) == len(SCENARIOS) and all(x.closed is not None for x in s)

    def stop(self) -> None:
        self.bg.call(self.proxy.close())
        self.bg.call(self.broker.close())
        self.bg.stop()


@pytest.fixture
def hostile_for() -> Iterator[Any]:
    made: list[Hostile] = []

    def make(real: Any) -> Hostile:
        h = Hostile(real)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def run_hostile_phase(h: Hostile, proc: Any, label: str, client_id: str) -> None:
    """Switch to the hostile broker until every scenario was played on the connection of
    ``client_id`` (the process's main one; its other connections get them too) and the
    client closed each, then back; check what the process did."""
    h.switch("hostile")
    try:
        wait_until(lambda: h.played_all(client_id), 30 + len(SCENARIOS) * (TRICKLE_BOUND + 1),
                   f"{label} to go through every hostile scenario")
    finally:
        h.switch("real")
    served = h.played(client_id)
    rss = peak_rss_mib(proc.pid)
    report = f"{client_id}: " + " ".join(f"{s.scenario}=" + (
        f"{s.noticed_after:.2f}s" if s.noticed_after is not None else "never") for s in served)
    print(f"[{label} vs hostile broker] connections={len(h.broker.served)} peak_rss={rss:.1f}MiB {report}")
    assert proc.running, f"{label} exited"
    slow = {s.scenario: s.noticed_after for s in served
            if s.noticed_after is None
            or s.noticed_after > (TRICKLE_BOUND if s.scenario == "trickle" else PROMPT)}
    assert not slow, f"{label} did not notice these violations in time (s): {slow}"
    assert rss < RSS_BOUND_MIB, f"{label} peak RSS {rss:.1f} MiB"
    noticed = [line for line in proc.log_text().splitlines() if VIOLATION.search(line)]
    assert len(noticed) >= len(SCENARIOS), (
        f"{label} logged {len(noticed)} violations for {len(SCENARIOS)} scenarios")


def assert_exact(result: dict[str, int]) -> None:
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert result["unexpected"] == 0, result
    assert result["out_of_order"] == 0, result


# ---------------------------------------------------------------- gateway and ingest


def test_gateway_against_a_hostile_cloud_broker_loses_nothing(tmp_path, broker_factory, proc_factory,
                                                              chaos, hostile_for):
    """--confirm broker: a bogus PUBACK taken for an acknowledgement would delete records
    that no broker ever held."""
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos,
                    gateway_args=("--confirm", "broker", "--keepalive", f"{KEEPALIVE:g}s"))
    h = hostile_for(pipe.cloud)
    pipe.proxy = h  # the gateway reaches the cloud through the switch
    pipe.start()
    load = pipe.load(2000, 250, "hostile-gw")
    wait_until(lambda: pipe.status()["counters"]["stored"] >= 200, 30, "200 records stored")
    run_hostile_phase(h, pipe.gateway, "gateway", f"edgeferry-gw-{pipe.node}")
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 60)
    assert_exact(pipe.tally("hostile-gw", sent, label="gateway across a hostile cloud broker"))


def test_ingest_against_a_hostile_cloud_broker_loses_nothing(tmp_path, broker_factory, proc_factory,
                                                             chaos, hostile_for):
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos)
    h = hostile_for(pipe.cloud)
    pipe.ingest = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", h.url,
                                "--sink", pipe.sink, "--client-id", "ingest-hostile",
                                "--keepalive", f"{KEEPALIVE:g}s", "--backoff-max", "1s"], "ingest")
    pipe.ingest.wait_for_line(r"ingest connected", 20)
    pipe.start_gateway()
    load = pipe.load(2000, 250, "hostile-ing")
    wait_until(lambda: pipe._count_lines() >= 200, 30, "200 rows at the sink")
    run_hostile_phase(h, pipe.ingest, "ingest", "ingest-hostile")
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 60)
    assert_exact(pipe.tally("hostile-ing", sent, label="ingest across a hostile cloud broker"))


# ---------------------------------------------------------------- a service

RELAY = textwrap.dedent("""
    from edge import Service

    svc = Service("relay", heartbeat=0, keepalive=KEEPALIVE)

    @svc.on("dt/{device}/x")
    async def relay(device: str, data: dict) -> None:
        await svc.publish(f"evt/relayed/{device}", {"n": data["n"]})
""")


async def test_service_against_a_hostile_local_broker_loses_nothing(tmp_path, edge_broker, proc_factory,
                                                                    hostile_for):
    """Both of the service's connections (session and publisher) go through the switch.
    Effects are counted by event id: a redelivered message is relayed again with the same
    id (at least once on the wire, once in effect)."""
    h = hostile_for(edge_broker)
    (tmp_path / "relay_mod.py").write_text(RELAY.replace("KEEPALIVE", repr(KEEPALIVE)))
    svc = proc_factory([PY, "-m", "edgeferry", "service", "run", "relay_mod:svc", "--broker", h.url,
                        "--state-dir", str(tmp_path / "state")], "relay", cwd=tmp_path)
    await asyncio.to_thread(svc.wait_for_line, r"service relay ready", 20)
    n = 300
    async with TestClient(edge_broker.url) as src, TestClient(edge_broker.url) as sink:
        out = await sink.subscribe("evt/relayed/#")

        async def feed(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                await src.publish_event(f"dt/dev{i % 5}/x", {"n": i})

        await feed(0, n // 3)
        await out.wait(n // 3, timeout=30)
        phase = asyncio.create_task(asyncio.to_thread(run_hostile_phase, h, svc, "service", "svc-relay"))
        await feed(n // 3, 2 * n // 3)  # published while the service is on the hostile broker
        await phase
        await feed(2 * n // 3, n)
        ids: dict[int, set[str]] = {}

        def effects() -> int:
            ids.clear()
            for m in out.messages:
                e = json.loads(m.payload)
                ids.setdefault(e["data"]["n"], set()).add(e["id"])
            return len(ids)

        async with asyncio.timeout(60):
            while effects() < n:
                await out.wait(len(out.messages) + 1, timeout=60)
    lost = n - len(set(ids) & set(range(n)))
    duplicated = sum(len(v) - 1 for v in ids.values())
    print(f"[service across a hostile local broker] sent={n} delivered={len(ids)} lost={lost} "
          f"duplicated={duplicated}")
    assert lost == 0 and duplicated == 0 and set(ids) == set(range(n))
