"""Interop: our MQTT client, services and gateway beside two clients written by others
(paho-mqtt and aiomqtt, both in the dev extra) on the same real Mosquitto.

QoS 0 and 1, retained messages, last wills and persistent sessions, in both directions:
what one side publishes the other receives, with the flags the protocol says.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from edge import Service
from edge.mqtt import Message, MQTTClient, Will
from edge.testing import TestClient
from tests.pipeline import Pipeline

TIMEOUT = 10.0


class Paho:
    """A paho-mqtt client on its own network thread; what it receives goes to a queue."""

    def __init__(self, broker: Any, client_id: str, clean_session: bool = True) -> None:
        self.broker = broker
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session)
        self.received: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, msg: self.received.put(msg)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def connect(self) -> Paho:
        self._connected.clear()
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT), "paho did not connect"
        return self

    def subscribe(self, flt: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(flt, qos)
        assert self._subscribed.wait(TIMEOUT), "paho got no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def take(self, n: int) -> list[paho.MQTTMessage]:
        return [self.received.get(timeout=TIMEOUT) for _ in range(n)]

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def aio(broker: Any, identifier: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, identifier=identifier, **kw)


async def take(client: aiomqtt.Client, n: int) -> list[aiomqtt.Message]:
    out: list[aiomqtt.Message] = []
    async with asyncio.timeout(TIMEOUT):
        async for m in client.messages:
            out.append(m)
            if len(out) == n:
                return out
    return out


# ---------------------------------------------------------------- the gateway


def test_paho_and_aiomqtt_publish_through_the_gateway_to_the_sink(tmp_path, broker_factory,
                                                                   proc_factory, chaos):
    """aiomqtt publishes QoS 1 and paho QoS 0 and 1 on dt/...; the gateway carries them
    to the cloud and ingest writes each once."""
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos).start()
    n = 50

    async def with_aiomqtt() -> None:
        async with aio(pipe.edge, "interop-aio") as c:
            for i in range(n):
                await c.publish("dt/aio/temp", json.dumps({"run": "aio", "n": i}), qos=1)

    asyncio.run(with_aiomqtt())
    p = Paho(pipe.edge, "interop-paho").connect()
    try:
        for i in range(n):
            p.publish("dt/paho/temp", json.dumps({"run": "paho", "n": i}).encode(), qos=i % 2)
    finally:
        p.disconnect()
    pipe.wait_delivered(2 * n, 30)
    for run in ("aio", "paho"):
        r = pipe.tally(run, n, label=f"interop {run} -> gateway -> sink")
        assert (r["lost"], r["duplicated"], r["unexpected"], r["out_of_order"]) == (0, 0, 0, 0)
    topics = {row["topic"] for row in pipe.rows()}
    assert topics == {"dt/aio/temp", "dt/paho/temp"}


# ---------------------------------------------------------------- services


async def test_service_handles_what_paho_publishes_and_aiomqtt_receives_its_events(edge_broker):
    svc = Service("interop", heartbeat=0)

    @svc.on("dt/{device}/temp")
    async def doubled(device: str, data: dict) -> None:
        await svc.publish(f"evt/doubled/{device}", {"v": 2 * data["v"]})

    p = Paho(edge_broker, "interop-paho-pub")
    async with svc.running(edge_broker.url), aio(edge_broker, "interop-aio-sub") as sub:
        # retained online state, set by the service, as a late subscriber sees it
        await sub.subscribe("state/interop", qos=1)
        [state] = await take(sub, 1)
        assert (state.payload, state.retain, state.qos) == (b"online", True, 1)
        await sub.subscribe("evt/doubled/#", qos=1)
        await asyncio.to_thread(p.connect)
        try:
            for v in range(5):
                await asyncio.to_thread(p.publish, "dt/d1/temp", json.dumps({"v": v}).encode(), v % 2)
            got = await take(sub, 5)
        finally:
            await asyncio.to_thread(p.disconnect)
    events = [json.loads(m.payload) for m in got]  # type: ignore[arg-type]
    print(f"[interop paho -> service -> aiomqtt] sent=5 delivered={len(events)}")
    assert sorted(e["data"]["v"] for e in events) == [0, 2, 4, 6, 8]
    assert all(e["specversion"] == "1.0" and e["type"] for e in events)
    assert {m.qos for m in got} == {1} and {str(m.topic) for m in got} == {"evt/doubled/d1"}


async def test_will_of_a_service_reaches_paho_and_a_clean_stop_says_offline(edge_broker):
    svc = Service("interop-will", heartbeat=0)

    @svc.on("dt/+/x")
    async def noop(data: dict) -> None:
        pass

    p = Paho(edge_broker, "interop-paho-state")
    await asyncio.to_thread(p.connect)
    try:
        await asyncio.to_thread(p.subscribe, "state/interop-will")
        async with svc.running(edge_broker.url):
            [online] = await asyncio.to_thread(p.take, 1)
            assert online.payload == b"online"
            svc._link.client.abort()  # the session connection dies without DISCONNECT
            [will] = await asyncio.to_thread(p.take, 1)
            assert will.payload == b"offline"
            [back] = await asyncio.to_thread(p.take, 1)  # it reconnects
            assert back.payload == b"online"
        [stopped] = await asyncio.to_thread(p.take, 1)
        assert stopped.payload == b"offline"
    finally:
        await asyncio.to_thread(p.disconnect)


# ---------------------------------------------------------------- the client


async def test_our_will_reaches_aiomqtt_and_aiomqtts_will_reaches_us(edge_broker):
    async with aio(edge_broker, "interop-aio-watch") as watch:
        await watch.subscribe("state/ours", qos=1)
        ours = MQTTClient(edge_broker.url, "interop-ours", will=Will("state/ours", b"gone", 1, False))
        await ours.connect()
        ours.abort()
        [m] = await take(watch, 1)
        assert (m.payload, m.qos, m.retain) == (b"gone", 1, False)

    async with TestClient(edge_broker.url) as tc:
        wills = await tc.subscribe("state/theirs")
        theirs = aio(edge_broker, "interop-aio-will",
                     will=aiomqtt.Will("state/theirs", b"gone", qos=1, retain=True))
        await theirs.__aenter__()
        theirs._client.socket().close()  # dies without DISCONNECT
        [w] = await wills.wait(1)
        assert w.payload == b"gone"
        try:
            await theirs.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass


async def test_retained_messages_both_ways(edge_broker):
    async with aio(edge_broker, "interop-aio-ret") as c:
        await c.publish("shadow/t1/desired", b'{"on": true}', qos=1, retain=True)
    ours = MQTTClient(edge_broker.url, "interop-ours-ret")
    await ours.connect()
    await ours.publish("shadow/t2/reported", b'{"on": false}', qos=0, retain=True)
    await ours.publish("shadow/t3/reported", b'{"on": null}', qos=1, retain=True)
    await ours.close()

    got: list[Message] = []
    sub = MQTTClient(edge_broker.url, "interop-ours-sub", on_message=got.append)
    await sub.connect()
    await sub.subscribe([("shadow/t1/#", 1)])
    await sub.ping()  # the retained message precedes the answer to this ping
    await sub.close()
    assert [(m.topic, m.payload, m.retain, m.qos) for m in got] == [
        ("shadow/t1/desired", b'{"on": true}', True, 1)]

    p = Paho(edge_broker, "interop-paho-ret")
    await asyncio.to_thread(p.connect)
    try:
        await asyncio.to_thread(p.subscribe, "shadow/+/reported")
        msgs = await asyncio.to_thread(p.take, 2)
    finally:
        await asyncio.to_thread(p.disconnect)
    assert sorted((m.topic, m.payload, m.retain, m.qos) for m in msgs) == [
        ("shadow/t2/reported", b'{"on": false}', True, 0),
        ("shadow/t3/reported", b'{"on": null}', True, 1)]


async def test_paho_persistent_session_gets_what_we_published_while_it_was_offline(edge_broker):
    p = Paho(edge_broker, "interop-paho-persist", clean_session=False)
    await asyncio.to_thread(p.connect)
    await asyncio.to_thread(p.subscribe, "evt/persist/#")
    await asyncio.to_thread(p.disconnect)

    ours = MQTTClient(edge_broker.url, "interop-ours-pub")
    await ours.connect()
    for i in range(5):
        await ours.publish(f"evt/persist/{i}", str(i).encode(), 1)
    await ours.publish("evt/persist/q0", b"q0", 0)  # QoS 0 is not queued for offline sessions
    await ours.close()

    p2 = Paho(edge_broker, "interop-paho-persist", clean_session=False)
    await asyncio.to_thread(p2.connect)
    try:
        msgs = await asyncio.to_thread(p2.take, 5)
    finally:
        await asyncio.to_thread(p2.disconnect)
    print(f"[interop ours -> offline paho session] sent=5 delivered={len(msgs)}")
    assert p2.session_present is True
    assert [m.payload for m in msgs] == [b"0", b"1", b"2", b"3", b"4"]
    assert p2.received.empty()


async def test_our_persistent_session_gets_what_aiomqtt_published_while_we_were_offline(edge_broker):
    got: list[Message] = []
    ours = MQTTClient(edge_broker.url, "interop-ours-persist", clean_session=False)
    await ours.connect()
    await ours.subscribe([("cmd/persist/#", 1)])
    await ours.close()

    async with aio(edge_broker, "interop-aio-pub") as c:
        for i in range(5):
            await c.publish(f"cmd/persist/{i}", str(i).encode(), qos=1)

    def on_message(m: Message) -> None:
        got.append(m)
        again.ack(m.pid)

    again = MQTTClient(edge_broker.url, "interop-ours-persist", clean_session=False,
                       on_message=on_message)
    present = await again.connect()
    await again.ping()  # the queued messages precede the answer
    await again.close()
    print(f"[interop aiomqtt -> our offline session] sent=5 delivered={len(got)}")
    assert present is True
    assert [(m.payload, m.qos) for m in got] == [(str(i).encode(), 1) for i in range(5)]
