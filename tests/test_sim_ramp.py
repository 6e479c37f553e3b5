"""The fleet's start-up ramp (firmware_sim/ramp.py) and ``--procs auto``: the window of
connection attempts backs off when CONNACKs slow down or the event loop runs late, and
still connects every device; devices waiting for their turn measure nothing; auto picks
the number of processes and the merged manifest verifies."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from firmware_sim import Fleet
from firmware_sim.chaos import ChaosProxy
from firmware_sim.ramp import Ramp
from firmware_sim.runner import DEVICES_PER_PROCESS, auto_procs, cpu_count
from tests.harness import Broker, Proc, wait_until
from tests.test_sim_e2e import _sink_rows, _site, _verify
from tests.test_sim_support import profile, until

PY = sys.executable


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_window_grows_on_quick_connacks_and_halves_on_each_signal() -> None:
    clock = Clock()
    r = Ramp(initial=8, floor=2, ceiling=64, hold=0.5, clock=clock)
    for _ in range(8):
        r.connack(0.01)
    assert r.window == 16  # slow start: one more per quick CONNACK
    r.lag(0.05)
    r.connack(0.01)
    assert r.window == 17  # lag under the limit
    r.lag(0.3)
    r.connack(0.01)
    assert r.window == 17 and r.lag_holds == 1, "a late loop stops the growth"
    clock.t += 0.6
    r.connack(0.01)
    assert r.window == 18, "and only for the hold"
    r.failed()
    assert r.window == 9 and r.backoffs["failure"] == 1
    r.failed()
    assert r.window == 9 and r.backoffs["failure"] == 1, "at most one back-off per hold"
    clock.t += 0.6
    r.connack(3.0)
    assert r.window == 4.5 and r.backoffs["latency"] == 1
    r.connack(0.01)
    assert r.window == 4.5 + 1 / 4.5, "after a back-off: about one more per window's worth"
    for _ in range(3):
        clock.t += 0.6
        r.failed()
    assert r.window == 2 == r.min_window, "never below the floor"


def test_slow_connacks_back_off_until_they_are_the_baseline() -> None:
    clock = Clock()
    r = Ramp(initial=16, floor=2, base_samples=10, latency_floor=0.25, hold=0.5, clock=clock)
    assert Ramp().latency_floor == 2.0, "the default: a fifth of the connect timeout"
    for _ in range(10):
        r.connack(0.005)
    w = r.window
    r.connack(0.2)  # slower, but under the floor: a busy broker, not a congested one
    assert r.window > w
    clock.t += 1
    r.connack(0.8)
    assert r.backoffs["latency"] == 1 and r.window < w
    # a far broker: every CONNACK takes 0.8 s; once they fill the samples, they are the
    # baseline and the window grows again
    for _ in range(12):
        clock.t += 1
        r.connack(0.8)
    low = r.window
    assert r.backoffs["latency"] < 12
    for _ in range(5):
        clock.t += 1
        r.connack(0.8)
    assert r.window > low and r.backoffs["latency"] < 12


async def test_slots_are_handed_out_in_order_and_never_beyond_the_window() -> None:
    r = Ramp(initial=2, floor=1, ceiling=2)
    order: list[int] = []

    async def one(i: int, go: asyncio.Event) -> None:
        await r.acquire()
        order.append(i)
        await go.wait()
        r.release()

    gates = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(one(i, gates[i])) for i in range(5)]
    await until(lambda: len(order) == 2, 5, "two slots taken")
    assert r.inflight == 2 and r.waiting == 3
    tasks[2].cancel()  # a device cancelled while waiting gives up its place
    await asyncio.gather(tasks[2], return_exceptions=True)
    gates[0].set()
    await until(lambda: len(order) == 3, 5, "the next one in")
    assert order == [0, 1, 3] and r.inflight == 2
    for g in gates:
        g.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert order == [0, 1, 3, 4] and r.inflight == 0 and r.max_inflight == 2


async def test_the_ramp_backs_off_behind_a_slow_link_and_still_connects_everyone(
    edge_broker: Broker,
) -> None:
    n = 120
    p = profile(devices=n, interval=0.5, sensors="temperature", seed=3, connect_rate=20)
    async with ChaosProxy(edge_broker.host, edge_broker.port) as proxy:
        async with Fleet(f"mqtt://127.0.0.1:{proxy.port}", p) as fleet:
            ramp = fleet.ramp
            await fleet.wait_connected(20, timeout=20)
            assert ramp.backoffs["latency"] == 0
            await proxy.delay(1.2)  # every CONNACK now takes 2.4 s or more
            # the attempts admitted before the back-offs finish; no more take their place
            await until(
                lambda: ramp.window <= 4 and ramp.inflight <= 4 and ramp.waiting > 0,
                40,
                "the window to shrink",
            )
            stats = fleet.stats()
            print(f"slow link: {stats}, window {ramp.window}, backoffs {ramp.backoffs}")
            assert ramp.backoffs["latency"] >= 2
            # devices still waiting for their first attempt measure nothing yet
            early = [
                d for d in fleet.devices
                if d.seqs[0] and d.counters["connects"] + d.counters["connect_failures"] == 0
            ]
            assert len(early) <= ramp.inflight, [d.name for d in early]
            assert sum(1 for d in fleet.devices if not d.measuring) >= stats["waiting"] > 0
            await proxy.up()
            await fleet.wait_connected(timeout=60)
            assert ramp.window > ramp.min_window, "the window grows again"
    m = fleet.manifest()
    assert len(m["devices"]) == n
    assert all(r["connects"] >= 1 for r in m["devices"].values())
    assert "outbox_full" not in m["totals"]["dropped_by_reason"], m["totals"]


async def test_a_late_event_loop_holds_the_window_without_stalling_the_ramp(
    edge_broker: Broker,
) -> None:
    p = profile(devices=60, interval=1, sensors="temperature", seed=4, connect_rate=30)
    async with Fleet(edge_broker.url, p) as fleet:
        ramp = fleet.ramp
        await fleet.wait_connected(5, timeout=20)
        loop = asyncio.get_running_loop()
        hogging = True

        def hog() -> None:  # a process that cannot keep up: its loop runs 0.3 s late
            time.sleep(0.3)
            if hogging:
                loop.call_later(0.05, hog)

        await until(lambda: ramp.inflight == 0, 20, "a quiet moment", step=0.05)
        w = ramp.window
        loop.call_soon(hog)
        await until(lambda: ramp.lag_holds >= 2, 20, "the lag noticed", step=0.05)
        connects = sum(d.counters["connects"] for d in fleet.devices)
        await until(
            lambda: sum(d.counters["connects"] for d in fleet.devices) >= connects + 5,
            20,
            "five more devices connected while the loop is late",
            step=0.05,
        )
        hogging = False
        assert ramp.window == w, "no growth while the loop runs late, and no back-off"
        assert ramp.backoffs == {"latency": 0, "failure": 0}
        await fleet.wait_connected(timeout=60)
    assert fleet.manifest()["totals"]["acked"] > 0


def test_auto_procs_counts_devices_per_process_and_cpus() -> None:
    assert auto_procs(profile(devices=10)) == 1
    assert auto_procs(profile(devices=DEVICES_PER_PROCESS), cpus=8) == 1
    assert auto_procs(profile(devices=DEVICES_PER_PROCESS + 1), cpus=8) == 2
    assert auto_procs(profile(devices=10_000), cpus=2) == 2
    assert auto_procs(profile(devices=10_000), cpus=8) == 4
    assert auto_procs(profile(devices=10_000), cpus=1) == 1
    assert auto_procs(profile(devices=10_000, chaos={"flap": "5-10:1-2"}), cpus=8) == 1


async def test_procs_auto_splits_a_large_fleet_and_the_merged_manifest_verifies(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    proc_factory: Callable[..., Proc],
) -> None:
    """``sim run`` without ``--procs`` on more than one process's worth of devices: as
    many processes as auto_procs says (two on a machine with two CPUs or more), one
    manifest, one ``sim verify`` against what went through the gateway."""
    n = DEVICES_PER_PROCESS + 100
    want = min(cpu_count(), 2)
    edge, sink, manifest = _site(tmp_path, broker_factory, proc_factory, "ingest-auto")
    sim = proc_factory(
        [PY, "-m", "edgeferry", "sim", "run", "--broker", edge.url, "--devices", str(n),
         "--interval", "3", "--duration", "8", "--seed", "6", "--sensors", "temperature",
         "--manifest", str(manifest), "--run-id", "auto-6", "--no-progress",
         "--stats-every", "1"],
        "sim-auto",
    )
    assert sim.wait(120) == 0, sim.log_tail()
    log = sim.log_text()
    stats = [json.loads(line[6:]) for line in log.splitlines() if line.startswith("stats {")]
    assert stats and all(s.get("procs", 1) == want for s in stats), stats[-1]
    assert max(s["connected"] for s in stats) == n
    if want > 1:
        assert f"{n} devices in {want} processes" in log
    m = json.loads(manifest.read_text())
    tot = m["totals"]
    assert m["run"] == "auto-6" and m["complete"] and len(m["devices"]) == n
    assert tot["dropped_by_reason"] == {}, tot
    wait_until(
        lambda: sum(1 for r in _sink_rows(sink) if r["topic"].startswith("dt/")) >= tot["acked"],
        60,
        f"{tot['acked']} telemetry rows in the sink",
    )
    rc, out = _verify(proc_factory, manifest, sink, "verify-auto", "--json")
    t = json.loads(out[out.index("{") :])["total"]
    print(f"[procs-auto {want}] sent={t['sent']} delivered={t['delivered']} lost={t['lost']}")
    assert rc == 0 and t["lost"] == 0 and t["sent"] == tot["sent"] > n
