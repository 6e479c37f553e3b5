"""The service SDK, each test body run twice: against edge.testing's in-memory broker and
against a real Mosquitto started from deploy/mosquitto/edge.conf."""

import asyncio
import base64
import uuid

import pytest
from pydantic import BaseModel

from edge import Event, Reject, Service
from edge.events import is_ulid
from edge.testing import MemoryBroker, TestClient


class Reading(BaseModel):
    value: float
    unit: str = "C"


class Doubled(BaseModel):
    device: str
    value: float


@pytest.fixture(params=["memory", "mosquitto"])
def broker(request):
    if request.param == "memory":
        return MemoryBroker()
    return request.getfixturevalue("edge_broker").url


def name() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def test_typed_handler_placeholders_model_and_correlation(broker):
    svc = Service(name(), heartbeat=0)
    calls = []

    @svc.on("dt/{device}/temperature")
    async def double(device: str, reading: Reading, event: Event) -> None:
        calls.append((device, reading, event.id))
        await svc.publish(f"evt/doubled/{device}", Doubled(device=device, value=reading.value * 2))
        await svc.publish(f"evt/raw/{device}", {"n": 1})

    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/#")
        eid = await tc.publish_event("dt/s1/temperature", {"value": 21.5, "unit": "F"})
        await tc.publish("dt/s2/temperature", b'{"value": 3}')  # raw JSON, no envelope
        got = await out.wait(4)
    assert [c[0] for c in calls] == ["s1", "s2"]
    assert calls[0][1] == Reading(value=21.5, unit="F") and calls[0][2] == eid
    assert calls[1][1] == Reading(value=3) and calls[1][2] is None
    by_topic = {m.topic: m.event for m in got}
    d1 = by_topic["evt/doubled/s1"]
    assert d1.data == {"device": "s1", "value": 43.0}
    assert d1.type == "io.edgeferry.doubled" and d1.subject == "s1"
    assert d1.source == f"/{svc.node_id}/services/{svc.name}"
    assert d1.correlationid == eid  # flows from the trigger
    assert by_topic["evt/raw/s1"].correlationid == eid
    assert is_ulid(d1.id) and d1.id[:10] == eid[:10]  # derived id keeps the trigger's time
    assert by_topic["evt/raw/s1"].type == "io.edgeferry.raw"
    # the raw trigger's two events share one fresh correlation id
    assert by_topic["evt/doubled/s2"].correlationid == by_topic["evt/raw/s2"].correlationid
    assert svc.counters["handled"] == 2


async def test_retries_then_dead_letter_and_keeps_running(broker):
    svc = Service(name(), heartbeat=0, retries=2, retry_initial=0.01, retry_cap=0.02)
    attempts: dict[str, int] = {}

    @svc.on("dt/{device}/x")
    async def flaky(device: str, data: dict) -> None:
        attempts[device] = attempts.get(device, 0) + 1
        if device == "bad" or (device == "flaky" and attempts[device] < 3):
            raise RuntimeError(f"boom {device}")
        if device == "reject":
            raise Reject("not for me")

    async with svc.running(broker), TestClient(broker) as tc:
        dlq = await tc.subscribe(f"dlq/{svc.name}")
        bad_id = await tc.publish_event("dt/bad/x", {"a": 1})
        await tc.publish_event("dt/flaky/x", {"a": 2})
        await tc.publish_event("dt/reject/x", {"a": 3})
        await tc.publish_event("dt/ok/x", {"a": 4})
        got = await dlq.wait(2)
        await tc.publish_event("dt/after/x", {"a": 5})  # still running after the dead letter
        await svc.wait_until(lambda s: "after" in attempts and s.counters["handled"] == 3)
    assert attempts == {"bad": 3, "flaky": 3, "reject": 1, "ok": 1, "after": 1}
    by_reason = {m.event.data["reason"]: m.event for m in got}
    assert set(by_reason) == {"handler_error", "rejected"}
    dead = by_reason["handler_error"]
    assert dead.type == "io.edgeferry.deadletter"
    assert dead.data["attempts"] == 3 and "boom bad" in dead.data["error"]
    assert dead.data["event_id"] == bad_id and dead.correlationid == bad_id
    assert dead.data["topic"] == "dt/bad/x"
    assert by_reason["rejected"].data["attempts"] == 1
    assert svc.counters["retried"] == 4 and svc.counters["handled"] == 3


BAD_INPUTS = [
    ("invalid_json", "dt/d1/t", b'{"value": '),
    ("not_utf8", "dt/d1/t", b'{"value": "\xff\xfe"}'),
    ("oversize", "dt/d1/t", b'{"value": 1, "pad": "' + b"x" * 3000 + b'"}'),
    ("schema", "dt/d1/t", b'{"value": "hot"}'),
    ("bad_envelope", "dt/d1/t", b'{"specversion": "1.0", "id": "", "source": "s", "type": "t"}'),
    ("no_route", "dt//t", b'{"value": 1}'),
]


@pytest.mark.parametrize("reason,topic,payload", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_goes_to_dead_letter_counted(broker, reason, topic, payload):
    svc = Service(name(), heartbeat=0, max_payload_bytes=2048)
    seen = []

    @svc.on("dt/{device}/t")
    async def handle(device: str, reading: Reading) -> None:
        seen.append((device, reading.value))

    async with svc.running(broker), TestClient(broker) as tc:
        dlq = await tc.subscribe(f"dlq/{svc.name}")
        await tc.publish(topic, payload)
        await tc.publish("dt/d2/t", b'{"value": 7}')  # a good one after it is still handled
        [dead] = await dlq.wait(1)
        await svc.wait_until(lambda s: seen)
        await tc.settle()
    assert seen == [("d2", 7.0)]
    assert dead.event.data["reason"] == reason
    assert "errors.pydantic.dev" not in dead.event.data["error"]  # one readable line
    assert dead.event.data["topic"] == topic
    assert dead.event.data["payload_bytes"] == len(payload)
    assert base64.b64decode(dead.event.data["payload"]) == payload
    assert svc.dead_lettered == {reason: 1}


async def test_duplicates_are_suppressed(broker, tmp_path):
    svc = Service(name(), heartbeat=0, state_dir=str(tmp_path))
    runs = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        runs.append(data["n"])

    async with svc.running(broker), TestClient(broker) as tc:
        eid = await tc.publish_event("dt/a/x", {"n": 1})
        await tc.publish_event("dt/a/x", {"n": 1}, id=eid)  # a publisher retry: same id
        await tc.publish_event("dt/b/x", {"n": 1}, id=eid)  # same id on another key
        await tc.publish_event("dt/a/x", {"n": 2})
        await tc.publish("dt/a/x", b'{"n": 3}')  # raw payloads have no id: never deduplicated
        await tc.publish("dt/a/x", b'{"n": 3}')
        await tc.settle()
        await svc.wait_until(lambda s: s.counters["handled"] + s.counters["duplicates"] >= 6, 10)
    assert runs == [1, 2, 3, 3]
    assert svc.counters["duplicates"] == 2
    # the table is on disk: a new run of the service still knows the id
    runs.clear()
    async with svc.running(broker), TestClient(broker) as tc:
        await tc.publish_event("dt/a/x", {"n": 1}, id=eid)
        await tc.publish_event("dt/a/x", {"n": 4})
        await svc.wait_until(lambda s: s.counters["handled"] + s.counters["duplicates"] >= 2, 10)
    assert runs == [4] and svc.counters["duplicates"] == 1


async def test_order_per_key_and_concurrency_across_keys(broker):
    svc = Service(name(), heartbeat=0, concurrency=3)
    order: dict[str, list[int]] = {}
    active = 0
    peak = 0
    three_at_once = asyncio.Event()

    @svc.on("dt/{device}/seq")
    async def handle(device: str, data: dict) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 3:
            three_at_once.set()
        try:
            if data["n"] == 0:
                # the first message of every key waits until three keys run at once:
                # a service that handled keys one after another would time out here
                await asyncio.wait_for(three_at_once.wait(), 10)
            for _ in range(data["n"] % 4):
                await asyncio.sleep(0)
            order.setdefault(device, []).append(data["n"])
        finally:
            active -= 1

    keys = ["k1", "k2", "k3", "k4"]
    async with svc.running(broker):  # the session exists; the backlog arrives as one burst
        pass
    async with TestClient(broker) as tc:
        for n in range(15):
            for k in keys:
                await tc.publish(f"dt/{k}/seq", {"n": n})
        await tc.settle()
    async with svc.running(broker):
        await svc.wait_until(lambda s: s.counters["handled"] >= 60, 20)
    assert order == {k: list(range(15)) for k in keys}
    assert three_at_once.is_set() and peak == 3  # concurrent, but never above the limit


async def test_health_online_will_heartbeat_and_reconnect(broker):
    svc = Service(name(), heartbeat=0.05)
    handled = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        handled.append(data["n"])

    async with TestClient(broker) as tc:
        state = await tc.subscribe(f"state/{svc.name}")
        beats = await tc.subscribe(f"state/{svc.name}/heartbeat")
        async with svc.running(broker):
            await state.wait(1, where=lambda m: m.payload == b"online")
            await tc.publish_event("dt/a/x", {"n": 1})
            [beat] = await beats.wait(1, where=lambda m: m.event.data["handled"] >= 1)
            assert beat.event.type == "io.edgeferry.heartbeat"
            assert {
                "received",
                "handled",
                "failed",
                "retried",
                "duplicates",
                "dead_lettered",
                "in_flight",
                "uptime_s",
            } <= set(beat.event.data)
            svc._client.abort()  # the connection dies without DISCONNECT: the will fires
            await state.wait(1, where=lambda m: m.payload == b"offline")
            await state.wait(2, where=lambda m: m.payload == b"online")  # reconnected
            await tc.publish_event("dt/a/x", {"n": 2})
            await svc.wait_until(lambda s: handled == [1, 2], 10)
            assert svc.counters["reconnects"] == 1
        await state.wait(2, where=lambda m: m.payload == b"offline")  # clean stop says offline too
    assert [m.payload for m in state.messages][-1] == b"offline"


async def test_publisher_connection_drop_is_survived(broker):
    """Handlers publish on a second, clean-session connection (their PUBACKs must not
    queue behind deliveries the session connection is holding back). When it dies, the
    publishes wait for the next one and go out once; receiving is not disturbed."""
    svc = Service(name(), heartbeat=0)

    @svc.on("dt/{device}/x")
    async def forward(device: str, data: dict) -> None:
        await svc.publish(f"evt/fwd/{device}", data)

    async with TestClient(broker) as tc:
        out = await tc.subscribe("evt/fwd/#")
        async with svc.running(broker):
            await tc.publish_event("dt/a/x", {"n": 1})
            await out.wait(1)
            first_pub = svc._link.pub
            assert first_pub is not svc._client
            first_pub.abort()
            for n in range(2, 6):
                await tc.publish_event("dt/a/x", {"n": n})
            await out.wait(1, 10, where=lambda m: m.event.data["n"] == 5)
            assert svc._link.pub is not first_pub and svc.counters["reconnects"] == 0
            await tc.settle()
    # at least once: a publish whose PUBACK the drop swallowed goes out again, with the
    # same event id, so a consumer applies each event once
    ids = {m.event.data["n"]: m.event.id for m in out.messages}
    assert sorted(ids) == [1, 2, 3, 4, 5]
    assert len({m.event.id for m in out.messages}) == 5
    assert [m.event.data["n"] for m in out.messages if m.event.data["n"] > 1] == [2, 3, 4, 5]


async def test_stop_drains_in_flight_handler_then_acks(broker):
    svc = Service(name(), heartbeat=0, drain_timeout=10, broker=broker)
    started = asyncio.Event()
    release = asyncio.Event()
    done = []

    @svc.on("dt/{device}/x")
    async def slow(device: str, data: dict) -> None:
        started.set()
        await release.wait()
        await svc.publish(f"evt/done/{device}", data)
        done.append(data["n"])

    async with TestClient(broker) as tc:
        out = await tc.subscribe("evt/done/#")
        await svc.__aenter__()
        try:
            await tc.publish_event("dt/a/x", {"n": 1})
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.create_task(svc.__aexit__(None, None, None))
            await asyncio.sleep(0)
            assert not stopping.done()  # waiting for the handler
            release.set()
            await asyncio.wait_for(stopping, 10)
        finally:
            if svc._entered:
                await svc.__aexit__(None, None, None)
        await out.wait(1)
    assert done == [1]
    # acknowledged: the next run of the service does not get it again
    again = []
    svc2 = Service(svc.name, heartbeat=0)

    @svc2.on("dt/{device}/x")
    async def record(device: str, data: dict) -> None:
        again.append(data["n"])

    async with svc2.running(broker), TestClient(broker) as tc:
        await tc.publish_event("dt/a/x", {"n": 2})
        await svc2.wait_until(lambda s: again, 10)
    assert again == [2]


async def test_drain_timeout_leaves_message_for_redelivery(broker):
    svc = Service(name(), heartbeat=0, drain_timeout=0.2)
    started = asyncio.Event()

    @svc.on("dt/{device}/x")
    async def stuck(device: str, data: dict) -> None:
        started.set()
        await asyncio.Event().wait()

    async with svc.running(broker), TestClient(broker) as tc:
        await tc.publish_event("dt/a/x", {"n": 1})
        await asyncio.wait_for(started.wait(), 10)
    # cancelled after the drain timeout, never acknowledged: it comes back
    again = []
    svc2 = Service(svc.name, heartbeat=0)

    @svc2.on("dt/{device}/x")
    async def record(device: str, data: dict, event: Event) -> None:
        again.append(data["n"])

    async with svc2.running(broker):
        await svc2.wait_until(lambda s: again, 10)
    assert again == [1]


async def test_message_is_acked_only_after_handler_returned():
    broker = MemoryBroker()
    svc = Service(name(), heartbeat=0)
    gate = asyncio.Event()
    entered = asyncio.Event()

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        entered.set()
        await gate.wait()

    async with svc.running(broker), TestClient(broker) as tc:
        await tc.publish_event("dt/a/x", {})
        await asyncio.wait_for(entered.wait(), 5)
        assert broker.unacked(f"svc-{svc.name}") == 1
        gate.set()
        await svc.wait_until(lambda s: s.counters["handled"] == 1, 5)
        await asyncio.sleep(0)  # the acknowledgement goes out at the end of that loop turn
        assert broker.unacked(f"svc-{svc.name}") == 0


async def test_retry_publishes_same_ids():
    broker = MemoryBroker()
    svc = Service(name(), heartbeat=0, retries=1, retry_initial=0.01, retry_cap=0.01)
    tries = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        await svc.publish(f"evt/x/{device}", {"try": len(tries)})
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("first attempt fails after publishing")

    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/#")
        await tc.publish_event("dt/a/x", {})
        got = await out.wait(2)
    assert got[0].event.id == got[1].event.id  # downstream dedup applies it once


async def test_backlog_is_held_at_the_broker_not_in_memory(broker):
    """With the handler stuck, the service stops reading once max_pending messages are in
    hand (plus at most one socket read); the rest waits at the broker."""
    svc = Service(name(), heartbeat=0, max_pending=20)
    gate = asyncio.Event()
    handled = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        await gate.wait()
        handled.append(data["n"])

    pad = "x" * 2000
    async with svc.running(broker), TestClient(broker) as tc:
        for n in range(400):
            await tc.publish(f"dt/d{n % 4}/x", {"n": n, "pad": pad})
        await tc.settle()
        await svc.wait_until(lambda s: s.stats()["in_flight"] >= 20, 10)
        for _ in range(20):  # give it every chance to read more than it should
            await asyncio.sleep(0.005)
        in_hand = svc.stats()["in_flight"]
        gate.set()
        await svc.wait_until(lambda s: len(handled) >= 400, 20)
    print(f"\nin hand while stuck: {in_hand} of 400 (max_pending 20)")
    limit = (
        20 if isinstance(broker, MemoryBroker) else 20 + 140
    )  # one 256 KiB read of 2 kB messages
    assert in_hand <= limit
    assert sorted(handled) == list(range(400))


async def test_messages_queued_while_offline_are_handled_and_acked_on_return(broker):
    svc = Service(name(), heartbeat=0)
    seen: list[int] = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        seen.append(data["n"])

    async with svc.running(broker):  # creates the persistent session
        pass
    async with TestClient(broker) as tc:
        for n in range(50):
            await tc.publish_event(f"dt/d{n % 3}/x", {"n": n})
        await tc.settle()
    async with svc.running(broker):
        await svc.wait_until(lambda s: len(seen) >= 50, 10)
    assert sorted(seen) == list(range(50))
    for d in range(3):  # in order per key
        assert [n for n in seen if n % 3 == d] == list(range(d, 50, 3))
    seen.clear()
    async with svc.running(broker), TestClient(broker) as tc:  # all were acknowledged
        await tc.publish_event("dt/d0/x", {"n": 99})
        await svc.wait_until(lambda s: seen, 10)
        await tc.settle()
    assert seen == [99]


async def test_broker_restart_reconnects_and_carries_on(edge_broker):
    """A real Mosquitto restart: the service reconnects with backoff, comes back online
    and handles what is published next."""
    svc = Service(name(), heartbeat=0)
    seen: list[int] = []

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        seen.append(data["n"])

    async with svc.running(edge_broker.url):
        async with TestClient(edge_broker.url) as tc:
            await tc.publish_event("dt/a/x", {"n": 1})
            await svc.wait_until(lambda s: seen == [1])
        await asyncio.to_thread(edge_broker.restart)
        await svc.wait_until(lambda s: s.counters["reconnects"] == 1 and s.online, 20)
        async with TestClient(edge_broker.url) as tc:
            await tc.publish_event("dt/a/x", {"n": 2})
            await svc.wait_until(lambda s: seen == [1, 2], 20)


async def test_handlers_that_publish_through_a_backlog_larger_than_max_pending(broker):
    """With a backlog at the broker the service stops taking messages once it holds
    max_pending; handlers that publish still need their acknowledgements, which arrive
    behind the queued deliveries. They must keep coming (no deadlock), and the held
    deliveries must stay in order. The backlog may also fill max_pending before connect()
    returns (it comes with the CONNACK): that pause must not be forgotten either."""
    url = broker
    svc = Service(name(), heartbeat=0, max_pending=8, concurrency=4)
    seen: list[int] = []

    @svc.on("dt/{device}/x")
    async def forward(device: str, data: dict) -> None:
        await svc.publish(f"evt/fwd/{device}", {"n": data["n"]})
        seen.append(data["n"])

    async with svc.running(url):  # creates the persistent session
        pass
    total = 2000
    async with TestClient(url) as tc:
        for n in range(total):
            await tc.publish_event(f"dt/d{n % 5}/x", {"n": n, "pad": "x" * 200})
        await tc.settle()
    async with TestClient(url) as tc:
        out = await tc.subscribe("evt/fwd/#")
        async with svc.running(url):
            await svc.wait_until(lambda s: len(seen) >= total, 60)
            await out.wait(total, 30)
    print(f"\nbacklog {total}, max_pending 8: handled {len(seen)}, forwarded {total}")
    assert sorted(seen) == list(range(total))
    for d in range(5):  # in order per key
        assert [n for n in seen if n % 5 == d] == list(range(d, total, 5))
