"""Each fault kind of the simulator, driven for real against Mosquitto."""

from __future__ import annotations

import orjson

from edge.events import parse_time
from firmware_sim import Fleet
from tests.harness import Broker
from tests.test_sim_support import Collector, delivered_or_dropped, profile, until


async def test_payload_faults_garbage_newer_firmware_duplicates_clock_skew(
    edge_broker: Broker,
) -> None:
    p = profile(
        devices=5,
        interval=0.03,
        sensors="temperature,door",
        seed=9,
        faults={
            "garbage": {"only": ["dev-0000"], "probability": 0.2},
            "newer_firmware": {
                "only": ["dev-0001"],
                "firmware": "3.0.0",
                "rename": {"value": "celsius"},
                "extra": {"schema": 3},
            },
            "duplicate": {"only": ["dev-0002"], "probability": 0.2},
            "clock_skew": {"only": ["dev-0003"], "seconds": 3600},
        },
    )
    async with Collector(edge_broker.url, ["dt/#", "state/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            await col.wait(
                lambda: all(len(col.seqs(f"dev-000{i}", "temperature")) >= 30 for i in range(5)),
                10,
                "30 readings from every device",
            )
    m = fleet.manifest()["devices"]
    # garbage: extra messages that are not readable events; the readings are all there
    raw = col.on("dt/dev-0000/temperature")
    unreadable = 0
    for g in raw:
        try:
            ev = orjson.loads(g.payload)
            ok = isinstance(ev, dict) and isinstance(ev.get("data"), dict)
        except orjson.JSONDecodeError:
            ok = False
        unreadable += not ok
    assert unreadable == m["dev-0000"]["garbage_sent"] > 3
    assert col.seqs("dev-0000", "temperature") == list(
        range(1, m["dev-0000"]["streams"]["temperature"]["last"] + 1)
    )
    assert all(g.payload for g in col.on("dt/dev-0001/temperature"))
    # newer firmware: renamed and extra fields, its version in birth and data
    newer = col.telemetry("dev-0001", "temperature")[0]["data"]
    assert (
        "celsius" in newer
        and "value" not in newer
        and newer["schema"] == 3
        and newer["fw"] == "3.0.0"
    )
    assert col.on("state/dev-0001")[0].json()["firmware"] == "3.0.0"
    assert "value" in col.telemetry("dev-0004", "temperature")[0]["data"]
    # duplicates: the very same message (same id) twice
    ids = [ev["id"] for ev in col.telemetry("dev-0002", "temperature")]
    twice = len(ids) - len(set(ids))
    assert twice == m["dev-0002"]["duplicates_sent"] > 3
    assert all(ids.count(i) <= 2 for i in ids)
    assert len(ids) == len(set(ids)) + twice
    # clock skew: an hour ahead; the others are on time
    for dev, ahead in (("dev-0003", 3600), ("dev-0004", 0)):
        g = col.on(f"dt/{dev}/temperature")[-1]
        assert abs(parse_time(g.json()["time"]) - g.at - ahead) < 5, dev
    assert m["dev-0003"]["faults"]["skew"] == 3600


async def test_storm_and_flapping_link(edge_broker: Broker) -> None:
    p = profile(
        devices=2,
        interval=0.5,
        sensors="temperature",
        seed=5,
        outbox=1000,
        faults={
            "storm": {"only": ["dev-0000"], "at": 0.6, "duration": 0.8, "rate": 100},
            "flap": {
                "only": ["dev-0001"],
                "at": 0.3,
                "duration": 1.5,
                "up": [0.15, 0.25],
                "down": [0.1, 0.2],
            },
        },
    )
    async with Collector(edge_broker.url, ["dt/#", "state/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            flapper = fleet.device("dev-0001")
            await until(
                lambda: (
                    fleet.faults_fired.get("storm") and not fleet.device("dev-0000").storm_until
                ),
                10,
                "the storm to end",
            )
            planned = sum(1 for t in flapper.faults.timed if t[1] == "drop")
            await until(
                lambda: fleet.faults_fired.get("drop") == planned and flapper.online,
                10,
                "every planned drop, then the device back online",
            )
    storm = [g.at for g in col.on("dt/dev-0000/temperature")]
    peak = max(sum(1 for t in storm if s <= t < s + 0.5) for s in storm)
    print(f"storm: {len(storm)} readings, at most {peak} in 0.5 s (1 normally)")
    assert peak >= 25
    rec = fleet.manifest()["devices"]["dev-0001"]
    drops = [f for f in rec["faults"]["timed"] if f[1] == "drop"]
    # a drop while the device is still reconnecting has no connection to break
    assert len(drops) >= 4 and len(drops) >= rec["abnormal_disconnects"] >= 3
    assert rec["connects"] == rec["abnormal_disconnects"] + 1
    wills = [g for g in col.on("state/dev-0001") if g.payload == b"offline"]
    assert (
        len(wills) == rec["abnormal_disconnects"] + 1
    )  # one will per broken link, plus the clean stop
    got, dropped, last = delivered_or_dropped(col, fleet, "dev-0001", "temperature")
    assert not dropped and got == set(range(1, last + 1)), "a flapping link loses nothing"


async def test_site_wide_outage_through_the_chaos_link(edge_broker: Broker) -> None:
    p = profile(
        devices=5,
        interval=0.05,
        sensors="temperature",
        seed=8,
        outbox=1000,
        chaos={"flap": "0.4-0.6:0.3-0.5", "mode": "cut"},
    )
    async with Collector(edge_broker.url, ["dt/#"]) as col:
        async with Fleet(edge_broker.url, p) as fleet:
            assert fleet.chaos is not None and fleet.url.port == fleet.chaos.port
            await until(
                lambda: fleet.chaos.cuts >= 2 and fleet.connected == 5,
                10,
                "two outages and everyone back",
            )
    print(f"chaos: {fleet.chaos.cuts} cuts, {fleet.stats()}")
    for d in fleet.devices:
        assert d.counters["connects"] >= 2, d.name
        got, dropped, last = delivered_or_dropped(col, fleet, d.name, "temperature")
        assert not dropped and got == set(range(1, last + 1)), d.name
