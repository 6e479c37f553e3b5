"""The in-memory client refuses what the real client refuses (the codec's checks), so a
test that passes in memory does not raise against a real broker."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError
from edge.mqtt import MQTTClient, Will
from edge.testing import MemoryBroker, MemoryClient

BAD_PUBLISHES = [
    ("qos 2", "dt/a", 2),
    ("qos 3", "dt/a", 3),
    ("wildcard +", "dt/+/x", 1),
    ("wildcard #", "dt/#", 0),
    ("empty topic", "", 1),
    ("topic over 65535 bytes", "t/" + "x" * 65535, 1),
    ("NUL in topic", "dt/\x00", 1),
]

BAD_FILTERS = [
    [("dt/#/x", 1)],
    [("dt/a+", 1)],
    [("dt/#", 2)],
    [],
]


def _clients():
    return [
        ("memory", lambda **kw: MemoryClient(MemoryBroker(), "c1", **kw)),
        ("mqtt", lambda **kw: MQTTClient("mqtt://127.0.0.1:9", "c1", **kw)),
    ]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind,make", _clients())
@pytest.mark.parametrize("label,topic,qos", BAD_PUBLISHES)
async def test_publish_refusals_match(kind, make, label, topic, qos):
    client = make()
    if kind == "memory":
        await client.connect()
    with pytest.raises(ConfigError):
        await client.publish(topic, b"x", qos)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind,make", _clients())
@pytest.mark.parametrize("filters", BAD_FILTERS)
async def test_subscribe_refusals_match(kind, make, filters):
    client = make()
    if kind == "memory":
        await client.connect()
    with pytest.raises(ConfigError):
        await client.subscribe(filters)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind,make", _clients())
@pytest.mark.parametrize("will", [Will("dt/+", b"x"), Will("dt/a", b"x", qos=2)])
def test_bad_will_refused_at_construction(kind, make, will):
    with pytest.raises(ConfigError):
        make(will=will)


@pytest.mark.timeout(10)
async def test_memory_client_still_delivers_valid_messages():
    broker = MemoryBroker()
    got = []
    sub = MemoryClient(broker, "sub", on_message=got.append)
    pub = MemoryClient(broker, "pub")
    await sub.connect()
    await pub.connect()
    assert await sub.subscribe([("dt/+", 1)]) == [1]
    await pub.publish("dt/a", b"1", 1)
    await pub.publish("dt/b", b"2", 0)
    for _ in range(5):
        if len(got) == 2:
            break
        await pub.drain()
    assert [(m.topic, m.payload) for m in got] == [("dt/a", b"1"), ("dt/b", b"2")]
