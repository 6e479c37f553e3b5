"""edge.mqtt.MQTTClient against a scripted fake broker (a small asyncio server in this file):
what it does with malformed packets, and each hang issue 8 found. Every test here failed
on the client before the codec split (names new since then are looked up inside the tests,
so the file ran against the old client too).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from edge import mqtt
from edge.errors import ConfigError, ConnectError, ConnectionLost
from edge.mqtt import MQTTClient, Will

pytestmark = pytest.mark.timeout(30)

CONNACK = b"\x20\x02\x00\x00"


def publish(topic: bytes, payload: bytes = b"", qos: int = 0, pid: int = 0, dup: bool = False,
            retain: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"") + payload
    assert len(body) < 128
    return bytes((0x30 | (8 if dup else 0) | (qos << 1) | int(retain), len(body))) + body


def puback(pid: int) -> bytes:
    return b"\x40\x02" + pid.to_bytes(2, "big")


class Conn:
    """The broker's end of one client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def packet(self) -> tuple[int, bytes]:
        """The next packet from the client: (first byte, body)."""
        first = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            b = (await self.reader.readexactly(1))[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        return first, await self.reader.readexactly(length)

    async def expect(self, first: int) -> bytes:
        got, body = await asyncio.wait_for(self.packet(), 10)
        assert got == first, f"expected packet {first:#x}, got {got:#x} {body!r}"
        return body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


class FakeBroker:
    def __init__(self) -> None:
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.all: list[Conn] = []
        self.clients: list[MQTTClient] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = Conn(r, w)
        self.all.append(conn)
        self.conns.put_nowait(conn)

    async def __aenter__(self) -> FakeBroker:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for c in self.clients:
            c.abort()
        self.server.close()
        for conn in self.all:
            conn.writer.close()
        for conn in self.all:
            try:
                await conn.writer.wait_closed()
            except OSError:
                pass
        await self.server.wait_closed()

    def client(self, **kw: object) -> MQTTClient:
        c = MQTTClient(self.url, "t", **kw)  # type: ignore[arg-type]
        self.clients.append(c)
        return c

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def session(self, connack: bytes = CONNACK, **kw: object) -> tuple[MQTTClient, Conn]:
        """A client connected to this broker, and the broker's end."""
        client = self.client(**kw)
        task = asyncio.create_task(client.connect())
        conn = await asyncio.wait_for(self.conns.get(), 10)
        await conn.expect(0x10)
        conn.send(connack)
        await asyncio.wait_for(task, 10)
        return client, conn


@pytest.fixture
async def fake():
    async with FakeBroker() as fb:
        yield fb


async def until(cond: object, within: float = 5) -> None:
    """Wait for a condition (checked on every loop turn, with a deadline)."""
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def closed_within(client: MQTTClient, seconds: float) -> str:
    """Wait until the connection ends; return why."""
    try:
        await asyncio.wait_for(asyncio.shield(client.closed), seconds)
    except ConnectionLost as e:
        return str(e)
    raise AssertionError("closed without ConnectionLost")


# ------------------------------------------------------------------ malformed packets


async def test_puback_of_length_0_completes_nothing(fake, caplog):
    """The issue's first case: a PUBACK with remaining length 0 took its packet id from
    the next packet's bytes (here 00 01: our pid 1) and completed the publish."""
    client, conn = await fake.session()
    got: list[object] = []
    client.on_message = got.append
    pub = await client.publish_nowait("a/b", b"x", 1)
    await conn.expect(0x32)
    conn.send(b"\x40\x00\x00\x01" + publish(b"a/b", b"y"))
    why = await closed_within(client, 5)
    assert pub is not None and isinstance(pub.exception(), ConnectionLost)
    assert got == []
    assert "PUBACK: remaining length 0" in why
    assert any("PUBACK: remaining length 0" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)


async def test_puback_of_length_0_then_publish(fake):
    client, conn = await fake.session()
    got: list[object] = []
    client.on_message = got.append
    pub = await client.publish_nowait("a/b", b"x", 1)
    await conn.expect(0x32)
    conn.send(b"\x40\x00" + publish(b"a/b", b"y"))
    await closed_within(client, 5)
    assert pub is not None and isinstance(pub.exception(), ConnectionLost)
    assert got == []


async def test_puback_one_byte_too_long_is_no_acknowledgement(fake):
    """The fake cloud broker's first trick: the right packet id, remaining length 3."""
    client, conn = await fake.session()
    pub = await client.publish_nowait("a/b", b"x", 1)
    await conn.expect(0x32)
    conn.send(b"\x40\x03\x00\x01\x00")
    why = await closed_within(client, 5)
    assert pub is not None and isinstance(pub.exception(), ConnectionLost)
    assert "PUBACK: remaining length 3" in why


async def test_zero_length_connack_then_pingresp_is_no_connection(fake):
    client = fake.client()
    task = asyncio.create_task(client.connect())
    conn = await fake.conns.get()
    await conn.expect(0x10)
    conn.send(b"\x20\x00\xd0\x00")
    with pytest.raises(ConnectError, match="CONNACK: remaining length 0"):
        await asyncio.wait_for(task, 5)
    assert not client.connected


@pytest.mark.parametrize("bad, rule", [
    (b"\x30\x04\x00\x09ab" + publish(b"c/d", b"next packet"), "run past the end"),
    (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    (b"\x30\x02\x00\x00", "empty topic"),
    (publish(b"a/+/c"), "wildcard"),
    (publish(b"a/#"), "wildcard"),
    (publish(b"a/b", b"x", qos=1, pid=0), "packet id 0"),
    (publish(b"a/b", b"x", qos=2, pid=3), "QoS 2"),
    (publish(b"a/\xff"), "UTF-8"),
], ids=["topic-past-end", "qos3", "empty-topic", "plus", "hash", "pid0", "qos2", "utf8"])
async def test_malformed_publish_is_not_delivered_and_closes(fake, caplog, bad, rule):
    client, conn = await fake.session()
    got: list[object] = []
    client.on_message = got.append
    conn.send(bad)
    why = await closed_within(client, 5)
    assert got == [], "a malformed PUBLISH was delivered"
    assert rule in why and "PUBLISH" in why
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and rule in errors[0], errors


async def test_huge_declared_length_closes_at_once(fake):
    client, conn = await fake.session(max_packet_bytes=1 << 20)
    conn.send(b"\x30\xff\xff\xff\x7f")
    why = await closed_within(client, 5)
    assert "exceeds the limit" in why


@pytest.mark.parametrize("bad, rule", [
    (puback(9), "answers no PUBLISH"),
    (b"\xd0\x00", "no PINGREQ outstanding"),
    (b"\x90\x03\x00\x07\x00", "answers no SUBSCRIBE"),
    (CONNACK, "a second CONNACK"),
    (b"\x82\x06\x00\x01\x00\x01a\x01", "never sends"),
], ids=["puback", "pingresp", "suback", "connack", "subscribe"])
async def test_answers_to_nothing_we_sent_close(fake, bad, rule):
    client, conn = await fake.session()
    conn.send(bad)
    assert rule in await closed_within(client, 5)


async def test_a_byte_a_second_is_not_life(fake):
    """The fake cloud broker's third trick: two bytes of a PUBLISH header, then one byte
    now and then. Only complete packets count: the unanswered PINGREQ ends it within
    1.25 x keepalive."""
    client, conn = await fake.session(keepalive=1)
    t0 = time.monotonic()
    conn.send(b"\x30\x7f")
    done = asyncio.ensure_future(asyncio.shield(client.closed))
    while not done.done() and time.monotonic() - t0 < 8:
        conn.send(b"a")
        await asyncio.wait([done], timeout=0.1)
    assert done.done(), "still connected after 8 s of trickling bytes"
    took = time.monotonic() - t0
    print(f"\n[trickle] noticed after {took:.2f} s (bound: 1.25 x keepalive 1 s)")
    assert took <= 1.25 + 0.5
    assert "PINGRESP" in str(done.exception())


# ------------------------------------------------------------------ hangs


async def test_window_waiters_all_return_on_connection_loss(fake):
    """max_inflight=2 and 8 concurrent publishers: on loss, every one raises."""
    client, conn = await fake.session(max_inflight=2)
    tasks = [asyncio.create_task(client.publish("a/b", b"x", 1)) for _ in range(8)]
    await conn.expect(0x32)
    await conn.expect(0x32)
    conn.close()
    done, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending, f"{len(pending)} of 8 publishers never returned"
    assert all(isinstance(t.exception(), ConnectionLost) for t in done)


async def test_window_slots_go_to_waiters_in_order_and_a_cancelled_one_passes_its_on():
    slots = mqtt._Slots(1)
    assert slots.take() and not slots.take()
    got: list[int] = []
    started = [asyncio.Event() for _ in range(3)]

    async def waiter(i: int) -> None:
        started[i].set()  # acquire() queues it before this task yields
        await slots.acquire()
        got.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    for e in started:
        await asyncio.wait_for(e.wait(), 5)
    assert not slots.take(), "others wait: no slot taken past them"
    slots.release()  # to waiter 0, whose task is cancelled before it runs
    tasks[0].cancel()
    slots.release()  # to waiter 1 (0 gave its slot back)... or 2 if 0 passed it on
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert got == [1, 2] and slots.free == 0
    slots.release()
    assert slots.free == 1 and slots.take()


async def test_held_malformed_publish_closes_instead_of_staying_paused(fake):
    """Paused after the first message; a truncated PUBLISH read with it must close the
    connection, not wait (paused, connected) to blow up later."""
    client, conn = await fake.session()
    got: list[object] = []

    def on_message(m: object) -> None:
        got.append(m)
        client.pause_reading()

    client.on_message = on_message
    conn.send(publish(b"a/1", b"x") + b"\x30\x04\x00\x09ab")
    why = await closed_within(client, 5)
    assert not client.connected and "run past the end" in why


async def test_on_message_exception_on_the_held_path_closes(fake, caplog):
    client, conn = await fake.session()
    seen: list[str] = []

    def on_message(m: mqtt.Message) -> None:
        seen.append(m.topic)
        if m.topic == "a/1":
            client.pause_reading()
        else:
            raise RuntimeError("handler bug")

    client.on_message = on_message
    conn.send(publish(b"a/1") + publish(b"a/2") + publish(b"a/3"))
    await until(lambda: seen)
    client.resume_reading()
    why = await closed_within(client, 5)
    assert seen == ["a/1", "a/2"]
    assert "handler bug" in why
    assert any("handler bug" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_on_message_exception_on_the_normal_path_closes(fake):
    client, conn = await fake.session()

    def on_message(m: object) -> None:
        raise RuntimeError("handler bug")

    client.on_message = on_message
    conn.send(publish(b"a/1", qos=1, pid=1))
    assert "handler bug" in await closed_within(client, 5)


async def test_drain_after_a_cancelled_publish(fake):
    client, conn = await fake.session()
    task = asyncio.create_task(client.publish("a/b", b"x", 1))
    await conn.expect(0x32)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    drain = asyncio.create_task(client.drain())
    await asyncio.sleep(0)
    assert not drain.done(), "drain returned before the PUBACK"
    conn.send(puback(1))
    await asyncio.wait_for(drain, 5)  # no CancelledError
    assert client.connected


async def test_qos2_is_refused_up_front(fake):
    client, conn = await fake.session()
    with pytest.raises(ConfigError, match="QoS 2"):
        await asyncio.wait_for(client.publish("a/b", b"x", 2), 2)
    with pytest.raises(ConfigError, match="QoS 2"):
        await asyncio.wait_for(client.subscribe([("a/#", 2)]), 2)
    assert client.connected


async def test_fields_too_long_for_mqtt_are_config_errors(fake):
    with pytest.raises(ConfigError, match="65535"):
        MQTTClient(fake.url, "c" * 70000)
    with pytest.raises(ConfigError, match="65535"):
        MQTTClient(fake.url, "c", will=Will("w" * 70000, b""))
    with pytest.raises(ConfigError, match="65535"):
        MQTTClient(fake.url, "c", will=Will("w", b"x" * 70000))
    with pytest.raises(ConfigError, match="keepalive"):
        MQTTClient(fake.url, "c", keepalive=70000)
    client, conn = await fake.session()
    with pytest.raises(ConfigError, match="65535"):
        await asyncio.wait_for(client.publish("t" * 70000, b"x", 1), 2)
    with pytest.raises(ConfigError, match="wildcard"):
        await asyncio.wait_for(client.publish("a/#", b"x", 1), 2)
    assert client.connected


@pytest.mark.timeout(60)
async def test_all_packet_ids_in_use_waits_instead_of_spinning(fake):
    """Publishes given up on keep their packet id until the broker answers; with all
    65535 taken, the next publish waits for one to come back."""
    client, conn = await fake.session(max_inflight=1)
    for _ in range(65535):
        fut = await client.publish_nowait("a", b"", 1)
        assert fut is not None
        fut.cancel()
    nxt = asyncio.create_task(client.publish("a", b"", 1))
    await asyncio.sleep(0.05)
    assert not nxt.done()
    conn.send(puback(77))
    for _ in range(65535):  # the publishes given up on
        await conn.expect(0x32)
    body = await conn.expect(0x32)  # the one that waited, with the id that came back
    assert body[3:5] == (77).to_bytes(2, "big")
    conn.send(puback(77))
    await asyncio.wait_for(nxt, 10)


async def test_refused_subscription_is_visible(fake):
    client, conn = await fake.session()
    task = asyncio.create_task(client.subscribe([("ok/#", 1), ("denied/#", 1)]))
    body = await conn.expect(0x82)
    conn.send(b"\x90\x04" + body[:2] + b"\x01\x80")
    granted = await asyncio.wait_for(task, 5)
    assert granted == [1, 0x80]
    assert mqtt.refused_filters([("ok/#", 1), ("denied/#", 1)], granted) == ["denied/#"]
    from edge.errors import ConnectError, SubscriptionRefused

    e = SubscriptionRefused(["denied/#"], fake.url)
    assert isinstance(e, ConnectError) and e.filters == ["denied/#"] and "denied/#" in str(e)


async def test_suback_with_the_wrong_number_of_codes_closes(fake):
    client, conn = await fake.session()
    task = asyncio.create_task(client.subscribe([("a/#", 1), ("b/#", 1)]))
    body = await conn.expect(0x82)
    conn.send(b"\x90\x03" + body[:2] + b"\x01")
    with pytest.raises(ConnectionLost, match="1 return codes for 2"):
        await asyncio.wait_for(task, 5)


# ------------------------------------------------------------------ keepalive and pings


async def test_each_pingresp_answers_the_oldest_ping(fake):
    client, conn = await fake.session()
    p1, p2 = client.ping(), client.ping()
    await conn.expect(0xC0)
    await conn.expect(0xC0)
    conn.send(b"\xd0\x00")
    await asyncio.wait_for(p1, 5)
    assert not p2.done(), "one PINGRESP answered two PINGREQs"
    conn.send(b"\xd0\x00")
    await asyncio.wait_for(p2, 5)


async def test_paused_connection_pings_and_arms_the_kernel_timeout(fake):
    """While paused nothing is read, so no PINGRESP can be seen: pings still go out and
    the socket's TCP_USER_TIMEOUT makes the kernel close a link that stops acknowledging
    them; it is cleared again on resume."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux only")
    client, conn = await fake.session(keepalive=2)
    sock = client._transport.get_extra_info("socket")  # type: ignore[union-attr]

    def user_timeout() -> int:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)

    got: list[object] = []

    def on_message(m: object) -> None:
        got.append(m)
        client.pause_reading()

    client.on_message = on_message
    conn.send(publish(b"a/1"))
    await conn.expect(0xC0)  # a ping while paused (nothing sent for keepalive / 2)
    assert got and user_timeout() == 1000
    client.resume_reading()
    assert user_timeout() == 0
    conn.send(b"\xd0\x00")
    await asyncio.sleep(0)
    assert client.connected


async def test_keepalive_timer_wakes_only_when_something_can_be_due(fake, monkeypatch):
    """A fleet process carries thousands of connections, so the keepalive timer must not
    wake on a fixed short period: it sleeps until the earliest moment a ping or the
    unanswered-ping check can be due. Over 4 keepalive periods an idle connection (its
    pings answered) and a busy one (a message each way every 50 ms) each wake about twice
    a period (once per half keepalive); the fixed keepalive / 8 period woke 8 times. Both
    stay connected, and the idle one kept pinging."""
    wakes: dict[int, int] = {}
    tick = MQTTClient._tick

    def counted(self: MQTTClient) -> None:
        wakes[id(self)] = wakes.get(id(self), 0) + 1
        tick(self)

    monkeypatch.setattr(MQTTClient, "_tick", counted)
    idle, idle_conn = await fake.session(keepalive=1)
    busy, busy_conn = await fake.session(keepalive=1)
    pings = {idle_conn: 0, busy_conn: 0}

    async def broker_side(conn: Conn) -> None:
        while True:
            first, _ = await conn.packet()
            if first == 0xC0:
                pings[conn] += 1
                conn.send(b"\xd0\x00")

    periods = 4
    async with asyncio.TaskGroup() as tg:
        answering = [tg.create_task(broker_side(c)) for c in (idle_conn, busy_conn)]
        t0 = time.monotonic()
        while time.monotonic() - t0 < periods * idle.keepalive:
            busy_conn.send(publish(b"down"))
            await busy.publish("up", b"x", qos=0)
            await asyncio.sleep(0.05)  # the pace of the busy connection's traffic
        for task in answering:
            task.cancel()
    counts = {"idle": wakes.get(id(idle), 0), "busy": wakes.get(id(busy), 0)}
    print(f"\n[keepalive timer] wake-ups in {periods} keepalive periods: {counts}; pings {list(pings.values())}")
    assert idle.connected and busy.connected
    assert pings[idle_conn] >= 2 * periods - 2, "the idle connection stopped pinging"
    for name, n in counts.items():
        assert n <= 3 * periods, f"the {name} connection's keepalive timer woke {n} times"


async def test_unanswered_ping_closes_within_the_bound(fake):
    client, conn = await fake.session(keepalive=1)
    t0 = time.monotonic()
    why = await closed_within(client, 5)
    took = time.monotonic() - t0
    print(f"\n[silent broker] noticed after {took:.2f} s (bound: 1.25 x keepalive 1 s)")
    assert took <= 1.25 + 0.4 and "PINGRESP" in why


# ------------------------------------------------------------------ acknowledgement order


async def test_pubacks_go_out_in_receipt_order(fake):
    """MQTT-4.6.0-2: handlers finish out of order, PUBACKs go out in arrival order."""
    client, conn = await fake.session()
    got: list[mqtt.Message] = []
    client.on_message = got.append
    conn.send(publish(b"a", qos=1, pid=10) + publish(b"a", qos=1, pid=11) + publish(b"a", qos=1, pid=12)
              + publish(b"a", qos=1, pid=13))
    await until(lambda: len(got) == 4)
    client.ack(12)
    client.ack_many([13, 11])
    client.ack(10)
    pids = [int.from_bytes(await conn.expect(0x40), "big") for _ in range(4)]
    assert pids == [10, 11, 12, 13]


async def test_ping_after_acks_follows_their_pubacks(fake):
    """The gateway acknowledges, then pings: the PINGRESP must prove the broker has the
    PUBACKs, so a ping waits for PUBACKs held back behind an earlier message."""
    client, conn = await fake.session()
    got: list[mqtt.Message] = []
    client.on_message = got.append
    conn.send(publish(b"a", qos=1, pid=1) + publish(b"a", qos=1, pid=2))
    await until(lambda: len(got) == 2)
    client.ack(2)
    ping = client.ping()
    client.ack(1)
    assert int.from_bytes(await conn.expect(0x40), "big") == 1
    assert int.from_bytes(await conn.expect(0x40), "big") == 2
    await conn.expect(0xC0)
    conn.send(b"\xd0\x00")
    await asyncio.wait_for(ping, 5)


async def test_same_pid_again_with_dup_is_delivered_and_acked_once(fake):
    client, conn = await fake.session()
    got: list[mqtt.Message] = []
    client.on_message = got.append
    conn.send(publish(b"a", b"1", qos=1, pid=5) + publish(b"a", b"1", qos=1, pid=5, dup=True))
    await until(lambda: len(got) == 2)
    assert [m.dup for m in got] == [False, True]
    client.ack(5)
    client.ack(5)
    assert int.from_bytes(await conn.expect(0x40), "big") == 5
    client.ping()
    await conn.expect(0xC0)  # no second PUBACK before the ping
    conn.send(publish(b"a", b"2", qos=1, pid=5) + publish(b"a", b"3", qos=1, pid=5))
    assert "still in use" in await closed_within(client, 5)


async def test_ack_many_batches_in_order_whatever_came_before(fake):
    """The gateway's path: one ack_many per commit, possibly after single acks of some of
    the same messages (duplicates, retained) and with a tuple instead of a list."""
    client, conn = await fake.session()
    got: list[mqtt.Message] = []
    client.on_message = got.append
    conn.send(b"".join(publish(b"a", qos=1, pid=p) for p in (1, 2, 3, 4, 5, 6)))
    await until(lambda: len(got) == 6)
    client.ack(2)  # held back behind 1
    client.ack_many([1, 2, 3])
    client.ack(6)  # held back behind 4 and 5
    client.ack_many((4, 5))
    pids = [int.from_bytes(await conn.expect(0x40), "big") for _ in range(6)]
    assert pids == [1, 2, 3, 4, 5, 6]
    client.ack_many([1, 99])  # acknowledged already, and never received: ignored
    client.ping()
    await conn.expect(0xC0)


# ------------------------------------------------------------------ the client, fuzzed

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None


def _stream_events() -> st.SearchStrategy[bytes]:
    pub = st.builds(
        lambda t, p, q, pid, r: publish(t, p, q, pid if q else 0, retain=r),
        st.sampled_from([b"a", b"dt/x/y", b"\xc3\xa9"]), st.binary(max_size=4),
        st.sampled_from([0, 1]), st.integers(1, 6), st.booleans())
    return st.one_of(pub, st.builds(puback, st.integers(1, 4)), st.just(b"\xd0\x00"),
                     st.just(b"\x90\x03\x00\x05\x01"), st.just(b"\xb0\x02\x00\x06"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_stream_events(), max_size=8), st.data())
def test_no_bytes_make_the_client_complete_or_deliver_what_they_do_not_hold(parts, data):
    """After the handshake, with three publishes (pids 1-3) waiting for PUBACK and a ping
    out: whatever bytes come (valid packets, changed here and there, in any reads),
    nothing escapes data_received, every delivered message and every completed publish
    is one the bytes hold whole, and a connection that refused something is closed."""
    from edge._codec import Decoder, PubAck  # the reference: the bytes' own packets
    from edge.errors import ProtocolError

    stream = bytearray(b"".join(parts))
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, max(0, len(stream) - 1)))
        if stream:
            stream[at] = (stream[at] + data.draw(st.sampled_from([1, 2, 255, 128]))) % 256
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))

    async def run() -> tuple[list[tuple[object, ...]], list[int], bool]:
        delivered: list[tuple[object, ...]] = []
        c = MQTTClient("mqtt://127.0.0.1:1", "fuzz", on_message=lambda m: delivered.append(
            (m.topic, m.payload, m.qos, m.retain, m.pid)))
        loop = asyncio.get_running_loop()
        c._closed, c._connack = loop.create_future(), loop.create_future()
        c._window = mqtt._Slots(64)
        c._alive = True
        c._transport = _Transport()  # type: ignore[assignment]
        proto = mqtt._Protocol(c)
        proto.data_received(CONNACK)
        await c._connack
        futs = [await c.publish_nowait("t", b"x", 1) for _ in range(3)]
        c.ping()
        pos = 0
        for cut in [*cuts, len(stream)]:
            proto.data_received(bytes(stream[pos:cut]))  # must not raise
            pos = cut
        done = [i + 1 for i, f in enumerate(futs) if f is not None and f.done() and not f.cancelled()
                and f.exception() is None]
        if c._closed.done():
            c._closed.exception()
        return delivered, done, c.connected

    delivered, completed, connected = asyncio.run(run())
    # the bytes' own packets, as far as they are whole and well-formed
    ref = Decoder()
    events: list[object] = []
    refused = False
    try:
        for i in range(len(stream)):
            events += ref.feed(bytes(stream[i : i + 1]))
    except ProtocolError:
        refused = True
    from edge._codec import encode_event

    # ... which are exactly bytes of the stream, not bytes borrowed from a neighbour
    assert bytes(stream).startswith(b"".join(encode_event(e) for e in events))  # type: ignore[arg-type]
    msgs = [(m.topic, m.payload, m.qos, m.retain, m.pid) for m in events if isinstance(m, mqtt.Message)]
    assert delivered == msgs[: len(delivered)], "delivered a message the bytes do not hold"
    acked = {e.pid for e in events if type(e) is PubAck}
    assert set(completed) <= acked, "completed a publish no PUBACK in the bytes answers"
    if refused:
        assert not connected, "a malformed packet left the connection up"


async def test_unsubscribe_and_answers_of_the_wrong_kind(fake):
    client, conn = await fake.session()
    task = asyncio.create_task(client.unsubscribe(["a/#"]))
    body = await conn.expect(0xA2)
    assert body[2:] == b"\x00\x03a/#"
    conn.send(b"\xb0\x02" + body[:2])
    await asyncio.wait_for(task, 5)
    # a SUBACK that answers an UNSUBSCRIBE, and a grant above what was asked
    task = asyncio.create_task(client.unsubscribe(["b/#"]))
    body = await conn.expect(0xA2)
    conn.send(b"\x90\x03" + body[:2] + b"\x00")
    with pytest.raises(ConnectionLost, match="SUBACK: packet id .* answers no SUBSCRIBE"):
        await asyncio.wait_for(task, 5)
    client, conn = await fake.session()
    task = asyncio.create_task(client.subscribe([("a/#", 0)]))
    body = await conn.expect(0x82)
    conn.send(b"\x90\x03" + body[:2] + b"\x01")
    with pytest.raises(ConnectionLost, match="granted QoS 1 above the QoS 0"):
        await asyncio.wait_for(task, 5)


async def test_connect_cancelled_while_waiting_for_connack_closes_its_socket(fake):
    """A caller that gives up on connect() (a stage cancelled during shutdown) must not
    leave the socket open: it stayed open, and showed up as an unclosed transport when
    the loop ended (found by house-gw)."""
    client = MQTTClient(fake.url, "t")  # not fake.client(): the fixture would abort it
    task = asyncio.create_task(client.connect())
    conn = await asyncio.wait_for(fake.conns.get(), 10)
    await conn.expect(0x10)  # CONNECT arrived; no CONNACK is ever sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client._transport is not None and client._transport.is_closing()
    assert not client.connected
    assert await asyncio.wait_for(conn.reader.read(), 5) == b""  # the broker sees it closed
