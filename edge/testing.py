"""Test services without Mosquitto: an in-memory broker with the MQTT semantics the SDK
relies on, and a small client to drive and observe a service.

::

    from edge.testing import MemoryBroker, TestClient

    async def test_alert():
        broker = MemoryBroker()
        async with svc.running(broker), TestClient(broker) as tc:
            alerts = await tc.subscribe("evt/alert/#")
            await tc.publish_event("dt/s1/temperature", {"value": 99})
            [msg] = await alerts.wait(1)
            assert msg.event.data["rule"] == "hot"

:class:`MemoryBroker` keeps persistent sessions (QoS 1 messages stay until acknowledged
and are sent again, flagged ``dup``, when the client comes back), retained messages,
last wills and an in-flight window per session. :class:`TestClient` takes a
:class:`MemoryBroker` or an ``mqtt://`` URL, so the same test body can run against a real
broker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge._client import Client, ClientFactory
from edge._codec import encode_connect, encode_publish, encode_subscribe
from edge.errors import ConnectError, ConnectionLost
from edge.events import Event, decode, encode, envelope
from edge.mqtt import Message, MQTTClient, Will
from edge.topics import matches

__all__ = ["Collector", "MemoryBroker", "MemoryClient", "TestClient"]


@dataclass
class _Session:
    client_id: str
    subs: dict[str, int] = field(default_factory=dict)
    queue: deque[tuple[str, bytes, int, bool]] = field(default_factory=deque)
    inflight: dict[int, tuple[str, bytes, int, bool]] = field(default_factory=dict)
    pids: itertools.cycle = field(default_factory=lambda: itertools.cycle(range(1, 65536)))
    client: MemoryClient | None = None
    clean: bool = True


class MemoryBroker:
    """An in-process MQTT broker for tests (one asyncio loop).

    ``max_inflight`` is the per-session window of unacknowledged QoS 1 messages (like
    Mosquitto's ``max_inflight_messages``); beyond it messages wait in the session queue.
    ``log`` records every message published, as ``(topic, payload, retain)``.
    """

    __test__ = False

    def __init__(self, *, max_inflight: int = 1000) -> None:
        self.max_inflight = max_inflight
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes, bool]] = []
        self._wills: dict[str, Will] = {}

    def __repr__(self) -> str:
        return f"MemoryBroker({len(self.sessions)} sessions)"

    # -- what the SDK calls -------------------------------------------------

    def client(self, client_id: str, **kwargs: Any) -> MemoryClient:
        """A client with :class:`edge.mqtt.MQTTClient`'s interface."""
        return MemoryClient(self, client_id, **kwargs)

    # -- test helpers -------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish as if from a device."""
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        self.log.append((topic, payload, retain))
        for s in self.sessions.values():
            granted = _best_qos(s.subs, topic)
            if granted is None:
                continue
            q = min(qos, granted)
            if s.client is None:
                if q and not s.clean:
                    s.queue.append((topic, payload, q, False))
                continue
            self._send(s, topic, payload, q, False)

    def kill(self, client_id: str) -> None:
        """Drop a client's connection as a crash would (its last will is published)."""
        s = self.sessions.get(client_id)
        if s is not None and s.client is not None:
            s.client.abort()

    def unacked(self, client_id: str) -> int:
        s = self.sessions.get(client_id)
        return 0 if s is None else len(s.inflight) + len(s.queue)

    # -- internals ----------------------------------------------------------

    def _send(
        self, s: _Session, topic: str, payload: bytes, qos: int, retain: bool, dup: bool = False
    ) -> None:
        c = s.client
        assert c is not None
        if qos == 0:
            c._deliver(Message(topic, payload, 0, retain, False, 0))
            return
        if len(s.inflight) >= self.max_inflight:
            s.queue.append((topic, payload, qos, retain))
            return
        pid = next(s.pids)
        while pid in s.inflight:
            pid = next(s.pids)
        s.inflight[pid] = (topic, payload, qos, retain)
        c._deliver(Message(topic, payload, qos, retain, dup, pid))

    def _connect(self, c: MemoryClient) -> bool:
        old = self.sessions.get(c.client_id)
        if old is not None and old.client is not None:
            old.client.abort()  # session takeover, like a real broker
        if c.clean_session or old is None:
            s = _Session(c.client_id, clean=c.clean_session)
            present = False
        else:
            s = old
            present = True
        self.sessions[c.client_id] = s
        s.client = c
        if c.will is not None:
            self._wills[c.client_id] = c.will
        else:
            self._wills.pop(c.client_id, None)
        return present

    def _resume(self, c: MemoryClient) -> None:
        s = self.sessions[c.client_id]
        for pid, (topic, payload, qos, retain) in list(s.inflight.items()):
            c._deliver(Message(topic, payload, qos, retain, True, pid))
        self._pump(s)

    def _pump(self, s: _Session) -> None:
        while s.queue and s.client is not None and len(s.inflight) < self.max_inflight:
            topic, payload, qos, retain = s.queue.popleft()
            self._send(s, topic, payload, qos, retain)

    def _subscribe(self, c: MemoryClient, filters: list[tuple[str, int]]) -> list[int]:
        s = self.sessions[c.client_id]
        for f, q in filters:
            s.subs[f] = min(q, 1)
        for f, q in filters:
            for topic, payload in list(self.retained.items()):
                if matches(f, topic):
                    self._send(s, topic, payload, min(q, 1), True)
        return [min(q, 1) for _, q in filters]

    def _ack(self, c: MemoryClient, pid: int) -> None:
        s = self.sessions.get(c.client_id)
        if s is not None and s.client is c:
            s.inflight.pop(pid, None)
            self._pump(s)

    def _gone(self, c: MemoryClient, clean: bool) -> None:
        s = self.sessions.get(c.client_id)
        if s is None or s.client is not c:
            return
        s.client = None
        will = self._wills.pop(c.client_id, None)
        if s.clean:
            del self.sessions[c.client_id]
        if not clean and will is not None:
            self.publish(will.topic, will.payload, will.qos, will.retain)


def _best_qos(subs: dict[str, int], topic: str) -> int | None:
    best = None
    for f, q in subs.items():
        if matches(f, topic) and (best is None or q > best):
            best = q
    return best


class MemoryClient:
    """The in-memory twin of :class:`edge.mqtt.MQTTClient` (same methods)."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: float = 30,
        will: Will | None = None,
        on_message: Callable[[Message], None] | None = None,
        max_inflight: int = 64,
        **_: Any,
    ) -> None:
        # the real client's checks (edge/_codec.py): what MQTTClient refuses, this refuses
        encode_connect(client_id, clean_session=clean_session,
                       keepalive=int(keepalive) if isinstance(keepalive, int | float) else keepalive,
                       will=(will.topic, will.payload, will.qos, will.retain) if will else None)
        self.broker = broker
        self.client_id = client_id
        self.clean_session = clean_session
        self.will = will
        self.on_message = on_message or (lambda m: None)
        self.session_present = False
        self._closed: asyncio.Future[None] | None = None
        self._entered = False
        # delivered by the broker, not yet handed over: one FIFO, so order holds across
        # pause_reading/resume_reading (as in MQTTClient, which stops reading its socket
        # and hands over the PUBLISHes it already read, in order, when resumed)
        self._inbox: deque[Message] = deque()
        self._paused = False
        self._drain_scheduled = False

    async def __aenter__(self) -> MemoryClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._closed is not None and not self._closed.done()

    @property
    def closed(self) -> asyncio.Future[None]:
        if self._closed is None:
            raise RuntimeError("not connected yet")
        return self._closed

    async def connect(self) -> bool:
        if getattr(self.broker, "down", False):
            raise ConnectError("memory broker is down")
        self._closed = asyncio.get_running_loop().create_future()
        self.session_present = self.broker._connect(self)
        # a persistent session's backlog comes right behind the CONNACK: like MQTTClient
        # parsing both from one read, hand it over before connect() returns
        self.broker._resume(self)
        self._drain()
        return self.session_present

    def _deliver(self, msg: Message) -> None:
        self._inbox.append(msg)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._paused:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        inbox = self._inbox
        while inbox and not self._paused and self.connected:
            self.on_message(inbox.popleft())

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        if self._inbox:
            self._schedule_drain()

    def _end(self, clean: bool, why: str) -> None:
        self._inbox.clear()  # unacknowledged: the session sends them again
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(ConnectionLost(why))
            self._closed.exception()
            self.broker._gone(self, clean)

    async def close(self) -> None:
        self._end(True, "closed by us")

    def abort(self) -> None:
        self._end(False, "aborted")

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        encode_subscribe(1, filters)  # the filters and QoS as the real client checks them
        self._check()
        await asyncio.sleep(0)
        return self.broker._subscribe(self, filters)

    def _check(self) -> None:
        if not self.connected:
            raise ConnectionLost("not connected")

    async def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None] | None:
        encode_publish(topic, payload, qos, retain, 1)  # QoS, topic, size as the real client checks
        self._check()
        self.broker.publish(topic, payload, qos, retain)
        if qos == 0:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        await self.publish_nowait(topic, payload, qos, retain)
        await asyncio.sleep(0)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def ack(self, pid: int) -> None:
        if self.connected:
            self.broker._ack(self, pid)

    def ack_many(self, pids: list[int]) -> None:
        for pid in pids:
            self.ack(pid)


# ---------------------------------------------------------------------------- TestClient


class Received:
    """A message a :class:`Collector` received; ``event`` is the decoded envelope (or a raw
    event), ``json`` the parsed payload."""

    __slots__ = ("topic", "payload", "retain")

    def __init__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.retain = retain

    @property
    def event(self) -> Event:
        return decode(self.payload)

    @property
    def json(self) -> Any:
        import orjson

        return orjson.loads(self.payload)

    def __repr__(self) -> str:
        return f"Received({self.topic!r}, {self.payload[:80]!r})"


class Collector:
    """Messages on one filter, in arrival order."""

    def __init__(self, flt: str) -> None:
        self.filter = flt
        self.messages: list[Received] = []
        self._changed = asyncio.Event()

    def _add(self, m: Received) -> None:
        self.messages.append(m)
        self._changed.set()

    async def wait(
        self,
        n: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109 - a test helper; the timeout is part of the call
        where: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Wait until ``n`` messages (that satisfy ``where``) arrived; return them."""

        async def _until() -> list[Received]:
            while True:
                got = [m for m in self.messages if where is None or where(m)]
                if len(got) >= n:
                    return got
                self._changed.clear()
                await self._changed.wait()

        try:
            async with asyncio.timeout(timeout):
                return await _until()
        except TimeoutError:
            got = [m for m in self.messages if where is None or where(m)]
            raise AssertionError(
                f"waited {timeout:g} s for {n} message(s) on {self.filter!r}; "
                f"got {len(got)}: {got[-3:]}"
            ) from None


class TestClient:
    """Publish to and observe a :class:`MemoryBroker` or a real broker (``mqtt://`` URL).

    It acknowledges everything it receives and uses a clean session.
    """

    __test__ = False
    _ids = itertools.count(1)

    def __init__(self, broker: MemoryBroker | str, client_id: str | None = None) -> None:
        self.broker = broker
        self.client_id = client_id or f"testclient-{id(self):x}-{next(self._ids)}"
        self._collectors: list[Collector] = []
        kw: dict[str, Any] = {"clean_session": True, "on_message": self._on_message}
        self._client: Client = (
            MQTTClient(broker, self.client_id, **kw)
            if isinstance(broker, str)
            else broker.client(self.client_id, **kw)
        )

    async def __aenter__(self) -> TestClient:
        await self._client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    def _on_message(self, msg: Message) -> None:
        r = Received(msg.topic, msg.payload, msg.retain)
        for c in self._collectors:
            if matches(c.filter, msg.topic):
                c._add(r)
        if msg.qos:
            self._client.ack(msg.pid)

    async def subscribe(self, flt: str) -> Collector:
        c = Collector(flt)
        self._collectors.append(c)
        await self._client.subscribe([(flt, 1)])
        return c

    async def publish(
        self, topic: str, payload: bytes | str | Any, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish bytes as they are; a str as UTF-8; anything else as JSON."""
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = encode(payload)
        await self._client.publish(topic, bytes(payload), qos, retain)

    async def publish_event(
        self,
        topic: str,
        data: Any,
        *,
        source: str = "/test/devices/test",
        type: str = "io.edgeferry.test",
        **attrs: Any,
    ) -> str:
        """Publish ``data`` in a CloudEvents envelope; return its id."""
        if hasattr(data, "model_dump"):
            data = data.model_dump(mode="json")
        env = envelope(source=source, type=type, data=data, **attrs)
        await self._client.publish(topic, encode(env), 1, False)
        return str(env["id"])

    async def settle(self) -> None:
        """Wait until the broker processed everything this client sent (a PINGRESP for a
        real broker, a loop turn for the memory broker)."""
        ping = getattr(self._client, "ping", None)
        if ping is not None:
            await ping()
        else:
            for _ in range(3):
                await asyncio.sleep(0)


if TYPE_CHECKING:  # mypy checks that the in-memory twins stay swappable for the real ones

    def _swappable(broker: MemoryBroker, client: MemoryClient, real: MQTTClient) -> None:
        _factory: ClientFactory = broker
        _clients: list[Client] = [client, real]
