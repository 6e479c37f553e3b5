"""A hostile MQTT broker for tests, and a proxy that switches between brokers.

:class:`HostileBroker` is a small asyncio server that completes the MQTT 3.1.1 handshake
(CONNACK) and then, on each connection, plays one scenario of :data:`SCENARIOS` (in
turn, one per connection): it sends the malformed packet(s) of that scenario and from
then on answers nothing. It never sends a valid PUBACK, so a client that takes anything
it sent for an acknowledgement has lost what it "acknowledged" (a gateway under
``--confirm broker`` deletes records). Until the scenario starts it answers SUBSCRIBE
with SUBACK and PINGREQ with PINGRESP, like a broker.

Each connection is recorded as a :class:`Served`: when the scenario was played
(``triggered``) and when the client closed its side (``closed``). A client that follows
the protocol closes the connection right after the violation (the keepalive bound for
the slow trickle, which never completes a packet).

:class:`SwitchProxy` forwards each new connection to the target chosen now; switching
cuts the open connections, so the clients reconnect to the new target.
:class:`Background` runs either on an event loop in a daemon thread, for sync tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

SCENARIOS = {
    "puback_len0_then_publish": "PUBACK with remaining length 0, then a PUBLISH",
    "connack_len0_then_pingresp": "a CONNACK with remaining length 0, then a PINGRESP",
    "puback_too_long": "a PUBACK one byte too long (remaining length 3) for each PUBLISH",
    "publish_topic_past_end": "a PUBLISH whose topic length runs past the end of the packet",
    "publish_qos3": "a PUBLISH with QoS 3",
    "publish_empty_topic": "a PUBLISH with an empty topic",
    "publish_wildcard_topic": "a PUBLISH whose topic holds a wildcard",
    "publish_pid0": "a QoS 1 PUBLISH with packet id 0",
    "garbage": "4 KiB of random bytes",
    # 300 MB does not fit a remaining length (four bytes say 268,435,455 at most)
    "huge_length": "a PUBLISH declaring 268,435,455 bytes, streamed until the client closes",
    "trickle": "two bytes of a PUBLISH header, then one byte a second, forever",
    "puback_unknown_pid": "a PUBACK for a packet id the client never sent",
}
# not a malformed packet: a broker that answers every QoS 1 PUBLISH with a correct PUBACK
# and delivers nothing (records acknowledged, then lost: the gap notice's case)
ACK_WITHOUT_DELIVERING = "ack_without_delivering"

# scenarios played on the client's first QoS 1 PUBLISH (they answer it; unprompted, for
# packet id 1, if none comes within two seconds); the others on the first SUBSCRIBE or
# PUBLISH, or one second after CONNACK if neither comes
ACK_SCENARIOS = {"puback_len0_then_publish", "puback_too_long", "puback_unknown_pid"}

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int = 0, pid: int = 1, flags: int | None = None) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if qos else b"") + payload
    first = 0x30 | (qos << 1) if flags is None else flags
    return bytes((first,)) + varint(len(body)) + body


def suback(subscribe_body: bytes) -> bytes:
    """The SUBACK granting each filter of a SUBSCRIBE the QoS it asked for (at most 1)."""
    codes = bytearray()
    i = 2
    while i < len(subscribe_body):
        i += 2 + int.from_bytes(subscribe_body[i : i + 2], "big")
        codes.append(min(subscribe_body[i], 1))
        i += 1
    return bytes((0x90,)) + varint(2 + len(codes)) + subscribe_body[:2] + bytes(codes)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One packet from the client: (type, flags, body). IncompleteReadError at EOF."""
    first = (await reader.readexactly(1))[0]
    length, mult = 0, 1
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * mult
        mult *= 128
        if byte < 0x80:
            break
    else:
        raise ValueError("malformed remaining length from the client")
    if length > 64 * 1024 * 1024:
        raise ValueError(f"client packet of {length} bytes")
    body = await reader.readexactly(length)
    return first >> 4, first & 0x0F, body


@dataclass
class Served:
    """One connection to the hostile broker (``scenario`` is set once its CONNECT is read)."""

    scenario: str
    opened: float
    client_id: str = ""
    triggered: float | None = None
    closed: float | None = None  # the client closed its side (EOF or reset)
    client_publishes: int = 0
    bytes_sent: int = 0

    @property
    def noticed_after(self) -> float | None:
        """Seconds from the violation to the client closing the connection."""
        if self.triggered is None or self.closed is None:
            return None
        return self.closed - self.triggered


@dataclass
class HostileBroker:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    seed: int = 8
    host: str = "127.0.0.1"
    linger: float = 120.0  # the broker itself closes a connection after this long
    served: list[Served] = field(default_factory=list)
    changed: asyncio.Event | None = None

    def __post_init__(self) -> None:
        unknown = set(self.scenarios) - set(SCENARIOS) - {ACK_WITHOUT_DELIVERING}
        if unknown:
            raise ValueError(f"unknown scenarios: {sorted(unknown)}")
        self._rng = random.Random(self.seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> HostileBroker:
        self.changed = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            with contextlib.suppress(Exception):
                await t

    def next_scenario(self, client_id: str) -> str:
        """Each client id goes through the scenarios in turn, one per connection."""
        n = sum(1 for x in self.served if x.client_id == client_id and x.scenario)
        return self.scenarios[n % len(self.scenarios)]

    def played(self, client_id: str) -> list[Served]:
        """The connections of one client id that got a scenario, in order."""
        return [x for x in self.served if x.client_id == client_id and x.scenario]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        s = Served("", time.monotonic())
        self.served.append(s)
        try:
            async with asyncio.timeout(self.linger):
                await self._play(s, reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if s.closed is None and reader.at_eof():
                s.closed = time.monotonic()
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)
            if self.changed is not None:
                self.changed.set()

    async def _play(self, s: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(data: bytes) -> None:
            s.bytes_sent += len(data)
            writer.write(data)

        ptype, _, body = await read_packet(reader)
        if ptype != CONNECT:
            return
        if len(body) >= 12:
            n = int.from_bytes(body[10:12], "big")
            s.client_id = body[12 : 12 + n].decode("utf-8", "replace")
        s.scenario = self.next_scenario(s.client_id)
        if s.scenario == "connack_len0_then_pingresp":
            s.triggered = time.monotonic()
            send(b"\x20\x00\xd0\x00")
            await self._until_closed(s, reader)
            return
        send(b"\x20\x02\x00\x00")  # accepted, no session
        if s.scenario == ACK_WITHOUT_DELIVERING:
            await self._ack_everything(s, send, writer, reader)
            return
        ack = s.scenario in ACK_SCENARIOS
        while True:
            try:
                async with asyncio.timeout(2.0 if ack else 1.0):
                    ptype, flags, body = await read_packet(reader)
            except TimeoutError:
                # a client that does not publish (or neither subscribes nor publishes)
                s.triggered = time.monotonic()
                if ack:
                    await self._ack_scenario(s, send, writer, reader, 1)
                    return
                break
            if ptype == PINGREQ:
                send(b"\xd0\x00")
            elif ptype == SUBSCRIBE:
                send(suback(body))
                if not ack:
                    break
            elif ptype == PUBLISH:
                s.client_publishes += 1
                qos = (flags >> 1) & 3
                if not ack:
                    break
                if qos:
                    tlen = int.from_bytes(body[:2], "big")
                    pid = int.from_bytes(body[2 + tlen : 4 + tlen], "big")
                    s.triggered = time.monotonic()
                    await self._ack_scenario(s, send, writer, reader, pid)
                    return
            elif ptype == DISCONNECT:
                s.closed = time.monotonic()
                return
        s.triggered = time.monotonic()
        await self._delivery_scenario(s, send, writer, reader)

    async def _ack_everything(self, s: Served, send: Callable[[bytes], None], writer: asyncio.StreamWriter,
                              reader: asyncio.StreamReader) -> None:
        s.triggered = time.monotonic()
        while True:
            ptype, flags, body = await read_packet(reader)
            if ptype == PINGREQ:
                send(b"\xd0\x00")
            elif ptype == SUBSCRIBE:
                send(suback(body))
            elif ptype == PUBLISH:
                s.client_publishes += 1
                if (flags >> 1) & 3:
                    tlen = int.from_bytes(body[:2], "big")
                    send(b"\x40\x02" + body[2 + tlen : 4 + tlen])
            elif ptype == DISCONNECT:
                s.closed = time.monotonic()
                return
            await writer.drain()

    async def _ack_scenario(self, s: Served, send: Callable[[bytes], None], writer: asyncio.StreamWriter,
                            reader: asyncio.StreamReader, pid: int) -> None:
        if s.scenario == "puback_len0_then_publish":
            send(b"\x40\x00" + publish(b"dt/hostile/x", b"{}", 0))
        elif s.scenario == "puback_unknown_pid":
            send(b"\x40\x02" + ((pid + 30000) % 65535 + 1).to_bytes(2, "big"))
        elif s.scenario == "puback_too_long":
            # every QoS 1 PUBLISH of this connection gets a PUBACK one byte too long
            send(b"\x40\x03" + pid.to_bytes(2, "big") + b"\x00")
            await writer.drain()
            while True:
                ptype, flags, body = await read_packet(reader)
                if ptype == PUBLISH and (flags >> 1) & 3:
                    s.client_publishes += 1
                    tlen = int.from_bytes(body[:2], "big")
                    p = body[2 + tlen : 4 + tlen]
                    send(b"\x40\x03" + p + b"\x00")
                elif ptype == DISCONNECT:
                    break
        await writer.drain()
        await self._until_closed(s, reader)

    async def _delivery_scenario(self, s: Served, send: Callable[[bytes], None],
                                 writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        sc = s.scenario
        if sc == "publish_topic_past_end":
            body = (200).to_bytes(2, "big") + b"dt/x" + b"\x00\x07" + b"{}"
            send(b"\x32" + varint(len(body)) + body + publish(b"dt/next/packet", b"{}", 0))
        elif sc == "publish_qos3":
            send(publish(b"dt/hostile/q3", b"{}", 1, 7, flags=0x36))
        elif sc == "publish_empty_topic":
            send(publish(b"", b"{}", 1, 7))
        elif sc == "publish_wildcard_topic":
            send(publish(b"dt/+/x", b"{}", 1, 7) + publish(b"ef/#", b"{}", 1, 8))
        elif sc == "publish_pid0":
            send(publish(b"dt/hostile/pid0", b"{}", 1, 0))
        elif sc == "garbage":
            send(self._rng.randbytes(4096))
        elif sc == "huge_length":
            send(b"\x30" + varint(268_435_455) + b"\x00\x04dt/x")
            chunk = bytes(64 * 1024)
            sent = 0
            closed = asyncio.ensure_future(self._until_closed(s, reader))
            try:
                while sent < 268_435_455 and not closed.done():
                    send(chunk)
                    sent += len(chunk)
                    await writer.drain()
            except ConnectionError:
                pass
            await closed
            return
        elif sc == "trickle":
            closed = asyncio.ensure_future(self._until_closed(s, reader))
            send(b"\x32\xff")
            try:
                data = b"\x7f" + bytes(16383)
                for b in data:
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await asyncio.shield(closed)
                    if closed.done():
                        break
                    send(bytes((b,)))
            except ConnectionError:
                pass
            await closed
            return
        await writer.drain()
        await self._until_closed(s, reader)

    @staticmethod
    async def _until_closed(s: Served, reader: asyncio.StreamReader) -> None:
        """Answer nothing more; read and drop what the client sends until it closes."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        s.closed = time.monotonic()


class SwitchProxy:
    """A TCP proxy to one of several targets; :meth:`switch` cuts every open link."""

    def __init__(self, targets: dict[str, tuple[str, int]], initial: str, host: str = "127.0.0.1") -> None:
        self.targets = dict(targets)
        self.current = initial
        self.host = host
        self.port = 0
        self.accepted: dict[str, int] = dict.fromkeys(targets, 0)
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> SwitchProxy:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def switch(self, name: str) -> None:
        if name not in self.targets:
            raise ValueError(f"no target {name!r}")
        self.current = name
        await self._cut()

    async def _cut(self) -> None:
        """Abort every open link (both sockets) and wait until their tasks are done."""
        tasks = list(self._links)
        for w in list(self._writers):
            w.transport.abort()
        for t in tasks:
            with contextlib.suppress(Exception):
                await t

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.add(cw)
        name = self.current
        self.accepted[name] += 1
        try:
            host, port = self.targets[name]
            try:
                tr, tw = await asyncio.open_connection(host, port)
            except OSError:
                return
            self._writers.add(tw)
            try:
                await asyncio.gather(self._pipe(cr, tw), self._pipe(tr, cw))
            finally:
                tw.transport.abort()
                self._writers.discard(tw)
        finally:
            cw.transport.abort()
            self._writers.discard(cw)
            self._links.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()  # one side ended: end both, like a cut link


class Background:
    """An event loop in a daemon thread: ``call(coro)`` runs a coroutine there and returns
    its result (for sync tests driving :class:`HostileBroker` and :class:`SwitchProxy`)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-broker", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 30.0) -> T:
        async def run() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
