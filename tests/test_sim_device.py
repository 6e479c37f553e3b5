"""Simulated devices against a real Mosquitto: birth, will, telemetry, determinism,
the outbox limit, commands and their replies."""

from __future__ import annotations

import time
from typing import Any

import orjson

from edge.events import is_ulid
from edge.mqtt import MQTTClient
from firmware_sim import Fleet
from tests.harness import Broker
from tests.test_sim_support import Collector, delivered_or_dropped, profile, until


async def test_birth_telemetry_and_last_will_of_a_dead_device(edge_broker: Broker) -> None:
    p = profile(
        devices=3,
        interval=0.1,
        seed=4,
        site="lab",
        faults={"die": {"only": ["dev-0001"], "at": 1.0, "down": 0.6}},
    )
    async with Collector(edge_broker.url, ["state/#", "dt/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            dead = fleet.device("dev-0001")
            await col.wait(
                lambda: len(col.on("state/dev-0001")) >= 3,
                10,
                "birth, will, second birth of dev-0001",
            )
            await col.wait(
                lambda: any(
                    ev["data"]["boot"] == 2 for ev in col.telemetry("dev-0001", "temperature")
                ),
                5,
                "telemetry after the second boot",
            )
        # a late subscriber gets the retained state
        async with Collector(edge_broker.url, ["state/#"], "late") as late:
            await late.wait(lambda: len(late.got) >= 3, 5, "retained state of 3 devices")
    birth = col.on("state/dev-0000")[0].json()
    assert birth["state"] == "online" and birth["firmware"] == "1.4.2" and birth["boot"] == 1
    assert birth["sensors"] == [
        "temperature",
        "humidity",
        "pressure",
        "vibration",
        "door",
        "battery",
    ]
    # dev-0001 died without DISCONNECT: the broker published its will
    states = [g.payload for g in col.on("state/dev-0001")]
    assert states[1] == b"offline", states
    assert orjson.loads(states[2])["boot"] == 2
    assert dead.counters["abnormal_disconnects"] == 1 and dead.boot == 2
    assert all(g.retain for g in late.got)
    assert {g.topic: g.payload for g in late.got}["state/dev-0002"] == b"offline"  # clean stop
    # telemetry: CloudEvents, one sequence per device and stream, never reused across boots
    ev = col.telemetry("dev-0000", "temperature")[0]
    assert ev["specversion"] == "1.0" and is_ulid(ev["id"])
    assert ev["source"] == "/lab/devices/dev-0000" and ev["subject"] == "dev-0000"
    assert ev["type"] == "io.edgeferry.telemetry.temperature" and ev["time"].endswith("Z")
    assert ev["data"]["unit"] == "C" and ev["simrun"] == fleet.run_id
    for dev in ("dev-0000", "dev-0001"):
        seqs = col.seqs(dev, "humidity")
        assert seqs == list(range(1, len(seqs) + 1)), (dev, seqs)
    boots = [ev["data"]["boot"] for ev in col.telemetry("dev-0001", "temperature")]
    assert boots == sorted(boots) and boots[0] == 1 and boots[-1] == 2
    m = fleet.manifest()
    assert m["devices"]["dev-0001"]["faults"]["timed"][0][1] == "die"
    ids = [ev["id"] for ev in col.telemetry("dev-0002", "pressure")]
    assert len(ids) == len(set(ids)) > 5


def _values(col: Collector, devices: list[str]) -> dict[tuple[str, str, int], Any]:
    out = {}
    for g in col.got:
        parts = g.topic.split("/")
        if parts[0] != "dt" or parts[1] not in devices:
            continue
        try:
            ev = g.json()
            key = (parts[1], parts[2], ev["data"]["seq"])
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue
        out.setdefault(key, []).append(ev["data"])
    return out


async def _run_for_values(url: str, seed: int, tag: str) -> tuple[dict, dict]:
    p = profile(
        devices=2,
        interval=0.03,
        seed=seed,
        faults={
            "duplicate": {"probability": 0.2},
            # planned (and compared) but after the run: a drop would resend in-flight messages
            "drop": {"devices": 0.5, "at": [50, 60], "down": 1},
        },
    )
    async with Collector(url, ["dt/#"], f"det-{tag}") as col:
        async with Fleet(url, p) as fleet:
            await col.wait(
                lambda: (
                    len(col.seqs("dev-0000", "temperature")) >= 25
                    and len(col.seqs("dev-0001", "temperature")) >= 25
                ),
                10,
                "25 readings each",
            )
    return _values(col, ["dev-0000", "dev-0001"]), fleet.manifest()


async def test_same_seed_gives_the_same_values_and_faults(edge_broker: Broker) -> None:
    a, ma = await _run_for_values(edge_broker.url, 11, "a")
    b, mb = await _run_for_values(edge_broker.url, 11, "b")
    c, mc = await _run_for_values(edge_broker.url, 12, "c")
    common = sorted(set(a) & set(b))
    assert len(common) > 100
    # same readings (values, seq, boot, firmware) and the same duplicated messages
    assert [a[k] for k in common] == [b[k] for k in common]
    assert any(len(a[k]) == 2 for k in common)
    faults = lambda m: {d: r.get("faults") for d, r in m["devices"].items()}  # noqa: E731
    assert faults(ma) == faults(mb) and faults(ma) != faults(mc)
    other = sorted(set(a) & set(c))
    assert [a[k] for k in other] != [c[k] for k in other]


async def test_outbox_keeps_the_newest_while_offline_and_counts_drops(edge_broker: Broker) -> None:
    p = profile(
        devices=1,
        interval=0.02,
        sensors="temperature",
        outbox=5,
        seed=1,
        faults={"drop": {"at": 0.4, "down": 0.6}},
    )
    async with Collector(edge_broker.url, ["dt/#", "state/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            dev = fleet.device("dev-0000")
            await until(lambda: dev.counters["connects"] >= 2, 10, "reconnect after the drop")
            await col.wait(
                lambda: (
                    len(set(col.seqs("dev-0000", "temperature"))) + dev.outbox.dropped
                    >= dev.seqs[0] - 2
                ),
                5,
                "the backlog to arrive",
            )
    got, dropped, last = delivered_or_dropped(col, fleet, "dev-0000", "temperature")
    rec = fleet.manifest()["devices"]["dev-0000"]
    print(f"sent {last}, delivered {len(got)}, dropped by the outbox {len(dropped)}")
    assert rec["dropped"]["outbox_full"] == len(dropped) > 10  # 0.6 s offline at 50/s, keeps 5
    assert got | dropped == set(range(1, last + 1)) and not got & dropped
    lo, hi = min(dropped), max(dropped)
    assert dropped == set(range(lo, hi + 1)), "the oldest are dropped, as one block"
    # the five newest readings of the outage were kept and sent after the reconnect
    assert set(range(hi + 1, hi + 6)) <= got
    assert col.on("state/dev-0000")[1].payload == b"offline"  # the broker fired the will
    assert rec["abnormal_disconnects"] == 1


class Commander:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client: MQTTClient | None = None

    async def __aenter__(self) -> Commander:
        self.client = MQTTClient(self.url, "sim-test-commander")
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.close()

    async def send(self, device: str, name: str, body: dict[str, Any]) -> None:
        assert self.client is not None
        await self.client.publish(f"cmd/{device}/{name}", orjson.dumps(body), 1)


def _replies(col: Collector) -> list[dict[str, Any]]:
    return [g.json() for g in col.on("evt/cmd/dev-0000")]


def _reply(col: Collector, cid: str) -> list[dict[str, Any]]:
    return [r for r in _replies(col) if r["data"]["id"] == cid]


async def test_commands_are_applied_once_and_answered(edge_broker: Broker) -> None:
    p = profile(devices=1, interval=0.05, sensors="temperature", seed=2, reboot_time=0.2)
    url = edge_broker.url
    async with Collector(url, ["evt/#", "state/#", "dt/#", "shadow/#"]) as col, Commander(url) as cmd:
        async with Fleet(url, p) as fleet:
            dev = fleet.device("dev-0000")
            await col.wait(lambda: col.on("state/dev-0000"), 5, "birth")
            # set_interval (plain JSON command)
            await cmd.send("dev-0000", "set_interval", {"id": "c1", "interval": 0.4})
            await col.wait(lambda: _reply(col, "c1"), 5, "reply to c1")
            r = _reply(col, "c1")[0]
            assert r["data"]["status"] == "succeeded" and r["data"]["reply"] == {"interval": 0.4}
            assert r["correlationid"] == "c1" and r["type"] == "io.edgeferry.command.status"
            n = len(col.seqs("dev-0000", "temperature"))
            await col.wait(
                lambda: len(col.seqs("dev-0000", "temperature")) >= n + 3, 5, "3 slow readings"
            )
            slow = [g.at for g in col.on("dt/dev-0000/temperature")][-3:]
            assert min(b - a for a, b in zip(slow, slow[1:], strict=False)) > 0.25
            # reboot (the gateway's form: an envelope with name, args and a time to live),
            # then the same command id again
            await cmd.send(
                "dev-0000",
                "reboot",
                {
                    "specversion": "1.0",
                    "id": "c2",
                    "source": "/t",
                    "type": "io.edgeferry.command",
                    "data": {"name": "reboot", "args": {}, "ttl_ms": 60000},
                },
            )
            await col.wait(lambda: len(col.on("state/dev-0000")) >= 3, 5, "offline and a new birth")
            states = col.on("state/dev-0000")
            assert states[1].payload == b"offline" and states[2].json()["boot"] == 2
            assert _reply(col, "c2")[0]["data"]["status"] == "succeeded"
            await cmd.send("dev-0000", "reboot", {"id": "c2"})
            await col.wait(lambda: len(_reply(col, "c2")) == 2, 5, "reply to the repeated c2")
            assert _reply(col, "c2")[1]["data"]["status"] == "succeeded"  # its first status again
            # an update: progress events, then a reboot into the new firmware
            await cmd.send("dev-0000", "ota", {"id": "c3", "version": "2.1.0", "duration": 0.3})
            await col.wait(lambda: len(col.on("state/dev-0000")) >= 5, 5, "birth after the update")
            new_birth = col.on("state/dev-0000")[4].json()
            assert new_birth["firmware"] == "2.1.0" and new_birth["boot"] == 3
            await col.wait(
                lambda: col.telemetry("dev-0000", "temperature")[-1]["data"]["fw"] == "2.1.0",
                5,
                "telemetry from the new firmware",
            )
            # unknown commands, commands without an id and expired ones are answered, not applied
            await cmd.send("dev-0000", "self_destruct", {"id": "c4"})
            await cmd.send("dev-0000", "reboot", {"no": "id"})
            await cmd.send("dev-0000", "ota", {"id": "c5"})
            await cmd.send("dev-0000", "reboot", {
                "specversion": "1.0", "id": "c6", "source": "/t", "type": "io.edgeferry.command",
                "data": {"name": "reboot", "args": {}, "ttl_ms": 0}})
            await col.wait(lambda: len(_replies(col)) >= 9, 5, "four more replies")
            assert dev.boot == 3, "the repeated and the expired reboot were not applied"
            # desired state: a newer version's interval is applied and reported
            await cmd.client.publish("shadow/dev-0000/desired",  # type: ignore[union-attr]
                                     orjson.dumps({"version": 2, "desired": {"interval": 0.3}}), 1)
            await cmd.client.publish("shadow/dev-0000/desired",  # type: ignore[union-attr]
                                     orjson.dumps({"version": 1, "desired": {"interval": 9}}), 1)
            await col.wait(lambda: col.on("shadow/dev-0000/reported"), 5, "a report")
            assert col.on("shadow/dev-0000/reported")[-1].json() == {"interval": 0.3}
            assert dev.interval == 0.3, "an older desired version is not applied after a newer one"
    progress = [g.json()["data"] for g in col.on("evt/ota/dev-0000")]
    assert [e["progress"] for e in progress] == [0, 25, 50, 75, 100]
    assert all(e["command_id"] == "c3" and e["version"] == "2.1.0" for e in progress)
    c3 = [r["data"]["status"] for r in _reply(col, "c3")]
    assert c3 == ["accepted", "succeeded"]
    statuses = {r["data"]["id"]: r["data"]["status"] for r in _replies(col)[-4:]}
    assert statuses == {"c4": "rejected", "": "rejected", "c5": "rejected", "c6": "expired"}
    seqs = col.seqs("dev-0000", "temperature")
    assert seqs == sorted(set(seqs)), "sequence numbers keep rising across reboots"
    c = fleet.manifest()["devices"]["dev-0000"]
    assert (c["commands_applied"], c["commands_duplicate"], c["commands_rejected"]) == (3, 1, 3)
    assert c["boots"] == 3 and c["firmware"] == "2.1.0"


async def test_many_devices_each_on_its_own_connection(edge_broker: Broker) -> None:
    p = profile(devices=200, interval=0.5, sensors="temperature", seed=3, jitter=0.2)
    async with Fleet(edge_broker.url, p) as fleet:
        await fleet.wait_connected(timeout=20)
        await fleet.run(1.5)  # every device past its first tick
        a0, t0 = fleet.acked, time.monotonic()
        await fleet.run(4.0)  # the measuring window: 1.5 s .. 4 s of the run
        a1, t1 = fleet.acked, time.monotonic()
        lag_ms = fleet.stats()["max_lag_ms"]
    rate = (a1 - a0) / (t1 - t0)
    print(
        f"200 devices: {rate:.1f} msg/s acknowledged, target {p.target_rate():.1f}, "
        f"worst event-loop lag {lag_ms} ms"
    )
    assert abs(rate - p.target_rate()) / p.target_rate() < 0.05
    assert lag_ms < 500, "the fleet never blocks its event loop for long"
    log = edge_broker.log_text()
    clients = {
        line.split(" as ")[1].split()[0]
        for line in log.splitlines()
        if "New client connected" in line and " as dev-" in line
    }
    assert len(clients) == 200


async def test_a_drop_takes_the_device_offline_at_once_and_counts_one_link(
    edge_broker: Broker,
) -> None:
    """``online`` must not outlive the link: a caller polling on the same loop tick as the
    drop would otherwise take a dead link for a live one (and stop the fleet on it)."""
    p = profile(devices=1, interval=0.1, sensors="temperature", seed=3)
    async with Collector(edge_broker.url, ["state/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            await fleet.wait_connected(timeout=10)
            dev = fleet.device("dev-0000")
            assert dev.online
            dev.drop_link(0.3)
            assert not dev.online, "online outlived the aborted link"
            await until(lambda: dev.online, 10, "the device back online after the drop")
    rec = fleet.manifest()["devices"]["dev-0000"]
    assert rec["connects"] == 2 and rec["abnormal_disconnects"] == 1
    wills = [g for g in col.on("state/dev-0000") if g.payload == b"offline"]
    assert len(wills) == 2  # the will of the dropped link, then the clean stop


async def test_two_devices_sharing_a_client_id_back_off(edge_broker: Broker) -> None:
    """Two simulated devices with one client id take each other's session over at every
    connect. The backoff starts over only after a connection stayed up (edge/backoff.py),
    as the service link's does, so they slow down instead of reconnecting at round-trip
    speed (a reset right after connecting kept the delays at the first, shortest one)."""
    p = profile(devices=1, interval=0.5, sensors="temperature", seed=3,
                reconnect={"initial": 0.05, "cap": 2.0})
    async with Fleet(edge_broker.url, p) as a, Fleet(edge_broker.url, p) as b:
        await a.run(3.0)
        connects = a.device("dev-0000").counters["connects"] + b.device("dev-0000").counters["connects"]
    print(f"[shared client id] connects in 3 s: {connects}")
    assert connects >= 3, "they did knock each other off"
    assert connects < 40, f"{connects} connects in 3 s: reconnecting at round-trip speed"
