"""The built-in aggregator and rules services, on the in-memory broker, driven by event
times in the envelopes (deterministic: no wall clock involved except where noted)."""

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.services import aggregator, rules
from edge.testing import MemoryBroker, TestClient

T0 = 1_800_000_000.0  # a window boundary for 60 s windows


def at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def agg():
    svc = aggregator.service
    svc.heartbeat = 0
    svc.load_config({"window": "60s", "grace": "5s"})
    yield svc
    svc.load_config({})


@pytest.fixture
def rules_svc():
    svc = rules.service
    svc.heartbeat = 0
    yield svc
    svc.load_config({})


async def send(tc, device, stream, value, t):
    return await tc.publish_event(f"dt/{device}/{stream}", value, time=at(t))


# ------------------------------------------------------------------------------ aggregator


async def test_aggregator_windows_per_device_and_stream(agg):
    broker = MemoryBroker()
    async with agg.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        for i, v in enumerate([1, 5, 3]):
            await send(tc, "d1", "temperature", {"value": v, "unit": "C"}, T0 + 1 + i)
        await send(tc, "d1", "humidity", 50, T0 + 2)  # a bare number is a sample too
        await send(tc, "d2", "temperature", 7.5, T0 + 3)
        closer = await send(tc, "d1", "temperature", 10, T0 + 61)  # next window: closes the first
        [m] = await out.wait(1)
        await agg.wait_until(lambda s: s.counters["handled"] >= 6, 10)
        await tc.settle()
        assert len(out.messages) == 1  # the other keys' windows are still open
    ev = m.event
    assert (
        m.topic == "evt/aggregate/d1" and ev.type == "io.edgeferry.aggregate" and ev.subject == "d1"
    )
    assert ev.data == {
        "device": "d1",
        "stream": "temperature",
        "window_start": T0,
        "window_end": T0 + 60,
        "count": 3,
        "min": 1.0,
        "max": 5.0,
        "mean": 3.0,
        "last": 3.0,
        "partial": False,
    }
    assert ev.correlationid == closer  # published inside the closing sample's handler


async def test_aggregator_cuts_uplink_volume_and_flushes_partial_windows_on_stop(agg):
    broker = MemoryBroker()
    async with TestClient(broker) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        async with agg.running(broker):
            for i in range(600):  # 10 Hz for 60 s
                await send(tc, "chatty", "temperature", 20 + (i % 10), T0 + i / 10)
            await send(tc, "chatty", "temperature", 0, T0 + 60.5)
            [m] = await out.wait(1)
            assert m.event.data["count"] == 600 and m.event.data["mean"] == 24.5
        # on a clean stop, the open window goes out marked partial
        [_, last] = await out.wait(2)
    assert last.event.data["partial"] is True and last.event.data["count"] == 1


async def test_aggregator_late_samples_stream_filter_and_bad_input(agg):
    agg.load_config({"window": 60, "streams": ["temperature"]})
    broker = MemoryBroker()
    async with agg.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        dlq = await tc.subscribe("dlq/aggregator")
        await send(tc, "d1", "temperature", 1, T0 + 61)
        await send(tc, "d1", "temperature", 2, T0 + 10)  # older than the open window: late
        await send(tc, "d1", "pressure", 1000, T0 + 62)  # not an aggregated stream
        await tc.publish("dt/d1/temperature", b'{"value": "warm"}')
        await tc.publish("dt/d1/temperature", b"true")
        got = await dlq.wait(2)
        await send(tc, "d1", "temperature", 3, T0 + 121)
        [m] = await out.wait(1)
        assert agg.counters["late"] == 1
    assert [d.event.data["reason"] for d in got] == ["schema", "schema"]
    assert m.event.data["count"] == 1 and m.event.data["last"] == 1.0


async def test_aggregator_fields_per_stream_and_objects_without_the_number(agg):
    agg.load_config({"window": 60, "fields": {"battery": "percent"}})
    broker = MemoryBroker()
    async with agg.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        dlq = await tc.subscribe("dlq/aggregator")
        await send(tc, "s1", "battery", {"percent": 80, "voltage": 4.1}, T0 + 1)
        await send(tc, "s1", "battery", {"percent": 70, "voltage": 4.0}, T0 + 2)
        await send(tc, "s1", "door", {"open": True, "changes": 3}, T0 + 3)  # no 'value': skipped
        await send(tc, "s1", "battery", {"percent": 60, "voltage": 3.9}, T0 + 61)
        [m] = await out.wait(1)
        await agg.wait_until(lambda s: s.counters["handled"] >= 4, 10)
        await tc.settle()
    assert m.event.data["stream"] == "battery" and m.event.data["mean"] == 75.0
    assert agg.counters["skipped"] == 1 and dlq.messages == []


async def test_aggregator_timer_closes_idle_windows(agg):
    agg.load_config({"window": "200ms", "grace": 0})
    broker = MemoryBroker()
    async with agg.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        await tc.publish("dt/quiet/temperature", b"21")  # raw: arrival time
        [m] = await out.wait(1, timeout=5)  # no later sample: the 1 s timer publishes it
    assert m.event.data["count"] == 1 and m.event.data["window_end"] <= time.time()


def test_aggregator_config_validation(agg):
    with pytest.raises(ConfigError, match="window"):
        agg.load_config({"window": "soon"})
    with pytest.raises(ConfigError, match="window"):
        agg.load_config({"window": 0})


# ------------------------------------------------------------------------------ rules


async def run_rules(svc, rule_list, samples, expect):
    """Feed (device, stream, value, t) samples; return the alert events, waiting for
    ``expect`` of them and checking no more arrive."""
    svc.load_config({"rules": rule_list})
    broker = MemoryBroker()
    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/alert/#")
        for device, stream, value, t in samples:
            await send(tc, device, stream, value, t)
        # every sample handled, then nothing more can come
        await svc.wait_until(lambda s: s.counters["handled"] >= len(samples), 10)
        got = await out.wait(expect) if expect else []
        await tc.settle()
        assert len(out.messages) == expect, [m.event.data for m in out.messages]
    return [m.event for m in got]


async def test_rules_threshold_with_hysteresis(rules_svc):
    rule = {"name": "hot", "stream": "temperature", "above": 30, "hysteresis": 1, "min_interval": 0}
    vals = [29, 31, 30.5, 29.5, 32, 28.9, 29.5]
    evs = await run_rules(
        rules_svc, [rule], [("d1", "temperature", v, T0 + i) for i, v in enumerate(vals)], 2
    )
    firing, cleared = evs
    assert (firing.type, firing.data["state"], firing.data["value"], firing.data["condition"]) == (
        "io.edgeferry.alert",
        "firing",
        31.0,
        "value > 30",
    )
    assert (cleared.type, cleared.data["state"], cleared.data["value"]) == (
        "io.edgeferry.alert.cleared",
        "cleared",
        28.9,
    )
    assert firing.subject == "d1" and firing.data["severity"] == "warning"
    assert firing.data["rate"] is None  # a threshold rule does not report a rate


async def test_rules_min_interval_prevents_an_alert_storm(rules_svc):
    rule = {"name": "hot", "stream": "temperature", "above": 30, "min_interval": "10s"}
    noisy = [("d1", "temperature", 31 if i % 2 == 0 else 28, T0 + i) for i in range(12)]
    evs = await run_rules(rules_svc, [rule], noisy, 4)
    # fire at 0, clear at 1; fires again only at t=10 (10 s later), clears at 11
    assert [(e.data["state"], e.data["at"] - T0) for e in evs] == [
        ("firing", 0),
        ("cleared", 1),
        ("firing", 10),
        ("cleared", 11),
    ]
    assert rules_svc.counters["suppressed"] == 4  # t = 2, 4, 6, 8


async def test_rules_rate_of_change_below_and_device_filter(rules_svc):
    rule_list = [
        {
            "name": "fast",
            "stream": "temperature",
            "rate_above": 0.5,
            "hysteresis": 0.1,
            "min_interval": 0,
        },
        {
            "name": "cold",
            "stream": "+",
            "below": 0,
            "devices": ["d2"],
            "min_interval": 0,
            "severity": "critical",
        },
    ]
    samples = [
        ("d1", "temperature", 20, T0),
        ("d1", "temperature", 21, T0 + 10),  # 0.1/s
        ("d1", "temperature", 23, T0 + 12),  # 1/s: fires
        ("d1", "temperature", 23.5, T0 + 22),  # 0.05/s: clears
        ("d1", "humidity", -5, T0 + 23),  # below 0, but the rule is only for d2
        ("d2", "humidity", -5, T0 + 24),  # fires
    ]
    evs = await run_rules(rules_svc, rule_list, samples, 3)
    assert [(e.data["rule"], e.data["device"], e.data["state"]) for e in evs] == [
        ("fast", "d1", "firing"),
        ("fast", "d1", "cleared"),
        ("cold", "d2", "firing"),
    ]
    assert evs[0].data["rate"] == pytest.approx(1.0) and evs[0].data["condition"] == "rate > 0.5/s"
    assert evs[2].data["severity"] == "critical"


async def test_rules_on_another_field_and_booleans(rules_svc):
    rule_list = [
        {"name": "door-open", "stream": "door", "field": "open", "above": 0.5, "min_interval": 0},
        {
            "name": "low-battery",
            "stream": "battery",
            "field": "percent",
            "below": 20,
            "min_interval": 0,
        },
        {
            "name": "battery-v",
            "stream": "battery",
            "field": "voltage",
            "below": 3.3,
            "min_interval": 0,
        },
    ]
    samples = [
        ("s1", "door", {"open": False, "changes": 1}, T0),
        ("s1", "door", {"open": True, "changes": 2}, T0 + 1),  # fires
        (
            "s1",
            "battery",
            {"percent": 15, "voltage": 3.5},
            T0 + 2,
        ),  # low-battery fires, voltage fine
        ("s1", "battery", {"voltage": 3.2}, T0 + 3),  # no percent: only the voltage rule looks
    ]
    evs = await run_rules(rules_svc, rule_list, samples, 3)
    assert [(e.data["rule"], e.data["value"]) for e in evs] == [
        ("door-open", 1.0),
        ("low-battery", 15.0),
        ("battery-v", 3.2),
    ]


def test_rules_config_validation(rules_svc):
    with pytest.raises(ConfigError, match="needs above, below"):
        rules_svc.load_config({"rules": [{"name": "x", "stream": "t"}]})
    with pytest.raises(ConfigError, match="unique"):
        rules_svc.load_config({"rules": [{"name": "x", "stream": "t", "above": 1}] * 2})
    with pytest.raises(ConfigError, match="min_interval"):
        rules_svc.load_config(
            {"rules": [{"name": "x", "stream": "t", "above": 1, "min_interval": "later"}]}
        )


def test_example_configs_load():
    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "services"
    for f in ("rules.yaml", "aggregator.yaml", "services.yaml"):
        doc = yaml.safe_load((deploy / f).read_text())
        if "rules" in doc:
            rules.service.load_config(doc["rules"])
        if "aggregator" in doc:
            aggregator.service.load_config(doc["aggregator"])
    assert len(rules.service.config.rules) >= 1
    rules.service.load_config({})
    aggregator.service.load_config({})
