"""A small asyncio MQTT 3.1.1 client built for throughput and explicit acknowledgement.

One :class:`MQTTClient` is one connection. It does what edgeferry needs and no more:
QoS 0 and 1, persistent or clean sessions, a last will, keepalive that notices a silent
link, a window of in-flight QoS 1 publishes, and *manual* acknowledgement of received
QoS 1 messages (the gateway acknowledges only after its store committed them).

The packets themselves are edge/_codec.py's: a codec with no I/O that checks every field
it encodes and every packet it decodes against its type's exact rules. This module moves
bytes and time. Any violation by the broker is a :class:`ProtocolError`: the connection
closes with one log line naming the packet and the rule, and nothing the bad packet (or
anything after it) says is acted upon: no publish completes, no message is delivered.
An exception raised by ``on_message`` closes the connection too (logged with its
traceback): its message is not acknowledged, so the broker sends it again next session.

Received messages are handed to a plain callback, packet by packet, in the order the
broker sent them; or, with ``on_batch`` instead of ``on_message``, as one list of plain
tuples per socket read (:data:`~edge._codec.RawPublish`: no object per message, the same
checks; the gateway's intake uses it). QoS 1 acknowledgements (:meth:`MQTTClient.ack`, :meth:`~MQTTClient.ack_many`)
may be given in any order; the client writes the PUBACKs in the order the PUBLISHes
arrived (MQTT-4.6.0-2), holding back one whose earlier ones are not acknowledged yet.
Reconnecting is the caller's job: make a new client (docs/decisions.md says why that, and
each caller resending its own unacknowledged publishes, stands in for MQTT's DUP resend).

The silent-link bound: a PINGREQ goes out when no complete packet was received for
``keepalive / 2`` seconds (or nothing was sent for as long); a PINGREQ not answered by
its PINGRESP within another ``keepalive / 2`` closes the connection with
:class:`ConnectionLost`, however many bytes of unfinished packets trickle in meanwhile:
only complete packets count. So a blackholed or stalled link is noticed about
``keepalive`` seconds after its last complete packet; the documented bound,
``1.25 * keepalive``, leaves a quarter for a late event loop. The check does not poll:
its timer is armed for the earliest moment a ping or the overdue answer can be due, and
re-armed after each check (a fleet process carries thousands of connections; a fixed
``keepalive / 8`` period cost 5.6 % of its CPU). One consequence: a single packet that
takes longer than about ``keepalive`` to arrive ends the connection (size
``max_packet_bytes`` and the keepalive to the slowest link).

While reading is paused (:meth:`MQTTClient.pause_reading`) the socket is not read, so no
PINGRESP can be seen. Pings still go out every ``keepalive / 2`` (the broker's side stays
alive) and, on Linux, the socket's ``TCP_USER_TIMEOUT`` is set to ``keepalive / 2``: a
link whose peer stops acknowledging those pings at the TCP level (cable pulled, a silent
4G drop) is closed by the kernel, within about ``1.25 * keepalive`` plus the kernel's
retransmission granularity; a peer that resets the connection is noticed at the next
ping. A broker process that hangs while its TCP stays up is noticed only once reading
resumes: the outstanding pings then get a fresh ``keepalive / 2`` to be answered.

Size: one connection's state (the publish window, packet ids, acknowledgement order,
pings and keepalive, pause and held deliveries, the batch receive path and burst reads
that share them) interlocks on connection loss, and is easiest to check in one place;
the packets themselves are in edge/_codec.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

from edge._codec import (
    DISCONNECT_PACKET,
    MAX_REMAINING,
    PINGREQ_PACKET,
    U16,
    ConnAck,
    Decoder,
    Message,
    PingResp,
    PubAck,
    RawPublish,
    SubAck,
    UnsubAck,
    check_topic,
    encode_connect,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    varint,
)
from edge._tls import TLSOptions, explain, read_secret
from edge._url import BrokerURL, parse_url
from edge.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
)

__all__ = [
    "BrokerURL",
    "Message",
    "MQTTClient",
    "Will",
    "encode_publish",
    "parse_url",
    "refused_filters",
]

log = logging.getLogger("edge.mqtt")

# the keepalive timer never waits less: a timer that fires a moment early (the loop's
# clock resolution) re-checks soon after instead of spinning
_MIN_WAKE = 0.01

_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes when the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MQTTClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._feed(data)

    def eof_received(self) -> bool:
        self.client._lost(ConnectionLost("broker closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed"))

    def pause_writing(self) -> None:
        self.client._can_write.clear()

    def resume_writing(self) -> None:
        self.client._can_write.set()


class _Slots:
    """The in-flight window of QoS 1 publishes: a semaphore whose free path is one
    comparison (asyncio.Semaphore builds a generator on every acquire, a publish's hot
    path). A released slot goes to the oldest waiter still waiting."""

    __slots__ = ("free", "_waiters")

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] | None = None  # made when first needed

    def take(self) -> bool:
        """Take a free slot without waiting; False when there is none (or others wait)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot as it was cancelled: pass it on
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


def _name(ev: object) -> str:
    return "PUBLISH" if type(ev) is Message or type(ev) is tuple else type(ev).__name__.upper()


_QOS1_NEW = frozenset((0x32, 0x33))
"""First bytes of a QoS 1 PUBLISH without DUP (retained or not): the batch path's common case."""
_PID = itemgetter(2)
_FIRST_BYTE = itemgetter(3)


def refused_filters(filters: list[tuple[str, int]] | list[str], granted: list[int]) -> list[str]:
    """The filters a SUBACK's return codes refused (0x80), e.g. to raise
    :class:`~edge.errors.SubscriptionRefused` with."""
    names = [f if isinstance(f, str) else f[0] for f in filters]
    return [f for f, g in zip(names, granted, strict=False) if g == 0x80]


class MQTTClient:
    """One MQTT 3.1.1 connection. Use as ``async with MQTTClient(...) as c:`` or call
    :meth:`connect` and :meth:`close` yourself.

    ``on_message`` is called synchronously for every PUBLISH received, in order; for
    QoS 1 the receiver must later call :meth:`ack` (or :meth:`ack_many`) with ``msg.pid``.
    ``on_batch`` instead: called with a list of (topic, payload, pid, first byte) tuples,
    the consecutive PUBLISHes of one socket read, in order (a pause asked for during the
    call takes effect after the list). ``max_inflight`` bounds QoS 1 publishes awaiting
    PUBACK; :meth:`publish` waits for room. ``read_hold`` (seconds, 0 by default): while
    messages stream in (a read of PUBLISHes within ``2 * read_hold`` of the previous
    one), the socket rests ``read_hold`` after each read, so the next read takes what
    gathered meanwhile in one go (fewer reads and wake-ups per message, each delivery up
    to ``read_hold`` later); a message after a quiet spell is read at once.
    Every argument is checked here: a client id or will that MQTT cannot carry, a
    keepalive above 65535 s or a QoS other than 0 and 1 is a :class:`ConfigError`.
    """

    def __init__(
        self,
        url: str | BrokerURL,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: float = 30,
        will: Will | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_batch: Callable[[list[RawPublish]], None] | None = None,
        max_inflight: int = 64,
        read_hold: float = 0.0,
        max_packet_bytes: int = 16 * 1024 * 1024,
        connect_timeout: float = 10.0,
        tls: TLSOptions | None = None,
        password_file: str | None = None,
    ) -> None:
        self.url = url if isinstance(url, BrokerURL) else parse_url(url)
        # for mqtts://: files read again at every connect (edge/_tls.py)
        self.tls = tls or self.url.tls_options
        self.password_file = password_file or self.url.password_file  # read at every connect, too
        self.client_id = client_id
        self.clean_session = clean_session
        if not isinstance(keepalive, int | float) or not 0 <= keepalive <= 65535:
            raise ConfigError(f"keepalive must be 0..65535 s, not {keepalive!r}")
        self.keepalive = max(1, int(keepalive))
        self.will = will
        if not isinstance(max_inflight, int) or not 0 < max_inflight <= 65535:
            raise ConfigError(f"max_inflight must be 1..65535, not {max_inflight!r}")
        self._connect_bytes = self._connect_packet()  # checks every field now
        if on_message is not None and on_batch is not None:
            raise ConfigError("give on_message or on_batch, not both")
        self.on_message = on_message or (lambda m: None)
        self.on_batch = on_batch
        self._handler = self._handle if on_batch is None else self._handle_batch
        self.max_inflight = max_inflight
        if not isinstance(read_hold, int | float) or not 0 <= read_hold <= 1:
            raise ConfigError(f"read_hold must be 0..1 s, not {read_hold!r}")
        self.read_hold = read_hold
        self._prev_read = 0.0  # when the socket was last read (with read_hold)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._decoder = Decoder(max_packet_bytes, raw=on_batch is not None)
        self.max_packet_bytes = max_packet_bytes
        self.connect_timeout = connect_timeout
        self.session_present = False
        self._transport: asyncio.Transport | None = None
        self._alive = False  # between connect() and the end of the connection
        self._got_connack = False
        self._connack: asyncio.Future[tuple[bool, int]] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}  # our QoS 1 publishes by pid
        self._subs: dict[int, tuple[asyncio.Future[Any], list[tuple[str, int]] | None]] = {}
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pid_waiters: list[asyncio.Future[None]] = []
        self._next_pid = 0
        self._window: _Slots | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._last_rx = self._last_tx = time.monotonic()
        # PINGREQs sent and not answered yet, oldest first: (when, waiter or None)
        self._pings: deque[tuple[float, asyncio.Future[None] | None]] = deque()
        # ping() calls waiting for held-back PUBACKs: (arrival number, waiter)
        self._parked_pings: list[tuple[int, asyncio.Future[None]]] = []
        # received QoS 1 PUBLISHes not PUBACKed yet: pid -> arrival number (negative once
        # the receiver acknowledged it, its PUBACK waiting for earlier ones), and the pids
        # in arrival order
        self._rx: dict[int, int] = {}
        self._rx_order: list[int] = []
        self._rx_head = 0  # _rx_order[_rx_head:] are the pids not PUBACKed yet
        self._rx_count = 0
        self._acked_high = 0  # the highest arrival number acknowledged by the receiver
        self._flushed = 0  # the arrival number of the last PUBACK written
        self._timer: asyncio.TimerHandle | None = None
        self._entered = False
        self._reading_paused = False  # the receiver asked for no more deliveries
        self._transport_paused = False  # the socket is not being read
        # PUBLISHes read (and checked) after a pause, in order; other packets behind
        # them are handled at once (RawPublish tuples with on_batch)
        self._held: deque[Any] = deque()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> MQTTClient:
        if self._entered:
            raise RuntimeError("an MQTTClient is one connection; it cannot be entered twice")
        self._entered = True
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._closed is not None and not self._closed.done()

    @property
    def closed(self) -> asyncio.Future[None]:
        """Completes (with :class:`ConnectionLost`) when the connection ends."""
        if self._closed is None:
            raise RuntimeError("not connected yet")
        return self._closed

    async def connect(self) -> bool:
        """Open the TCP connection, send CONNECT, wait for CONNACK; return session_present."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._connack = loop.create_future()
        self._window = _Slots(self.max_inflight)
        self._alive = True
        tls = (self.tls or TLSOptions()) if self.url.tls else None
        if self.password_file:
            self.url = replace(self.url, password=read_secret(self.password_file))
            self._connect_bytes = self._connect_packet()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: _Protocol(self), self.url.host, self.url.port,
                    ssl=tls.context() if tls else None,
                    server_hostname=tls.server_name if tls and tls.server_name else None,
                )
                self._write(self._connect_bytes)
                present, code = await self._connack
        except TimeoutError:
            self._abort()
            raise ConnectError(f"{self.url}: no CONNACK within {self.connect_timeout:g} s") from None
        except ConnectionLost as e:  # before OSError, which it is
            self._abort()
            why = explain(e)[1] if tls else str(e)
            raise ConnectError(why if str(self.url) in why else f"{self.url}: {why}") from None
        except OSError as e:
            self._abort()
            raise ConnectError(f"{self.url}: {explain(e.strerror or e)[1] if tls else e.strerror or e}") from None
        except BaseException:  # cancelled (the caller gave up): never leave the socket open
            self._abort()
            raise
        if code:
            self._abort()
            reason = _CONNACK_CODES.get(code, f"code {code}")
            raise ConnectError(f"{self.url} refused the connection: {reason}", code)
        self.session_present = present
        if self._alive:
            self._arm()
        return present

    def _connect_packet(self) -> bytes:
        will = self.will
        return encode_connect(
            self.client_id,
            clean_session=self.clean_session,
            keepalive=self.keepalive,
            will=None if will is None else (will.topic, will.payload, will.qos, will.retain),
            username=self.url.username,
            password=self.url.password,
        )

    async def close(self) -> None:
        """Send DISCONNECT (the will is discarded) and close the connection."""
        if self._transport is not None and self.connected:
            self._write(DISCONNECT_PACKET)
            self._transport.close()
        self._lost(ConnectionLost("closed by us"))

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        self._abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._lost(ConnectionLost("aborted"))

    def _lost(self, exc: ConnectionLost) -> None:
        self._alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        for fut in (self._connack, self._closed):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved; connect() and the closed watcher re-raise it
        waiting: list[asyncio.Future[Any]] = list(self._pending.values())
        waiting += [f for f, _ in self._subs.values()]
        waiting += [f for _, f in self._pings if f is not None]
        waiting += [f for _, f in self._parked_pings]
        waiting += self._drain_waiters + self._pid_waiters
        self._pending, self._subs = {}, {}
        self._pings.clear()
        self._parked_pings, self._drain_waiters, self._pid_waiters = [], [], []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._held.clear()  # unacknowledged: the broker sends them again next session
        self._rx.clear()
        self._rx_order.clear()
        self._rx_head = 0
        self._can_write.set()
        if self._window is not None:
            # wake one publisher waiting for room: it sees the closed connection and
            # passes the wake-up on to the next (publish_nowait), so every one returns
            self._window.release()

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        """Close the connection because of a protocol violation or a callback's exception."""
        if not self._alive:
            return
        if exc is None:
            log.error("%s: protocol error, closing the connection: %s", self.url, why)
        else:
            log.error("%s: closing the connection: %s", self.url, why, exc_info=exc)
        self._lost(ConnectionLost(f"{'protocol error from ' if exc is None else ''}{self.url}: {why}"))

    # ---------------------------------------------------------------- sending

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionLost("not connected")
        self._transport.write(data)
        self._last_tx = time.monotonic()

    def _alloc_pid(self) -> int:
        """A packet id not in use, or 0 if all 65535 are."""
        pid = self._next_pid
        pending, subs = self._pending, self._subs
        if len(pending) + len(subs) >= 65535:
            return 0
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in pending and pid not in subs:
                self._next_pid = pid
                return pid

    async def _new_pid(self) -> int:
        pid = self._alloc_pid()
        while not pid:
            # every id waits for its acknowledgement (publishes given up on by their
            # callers keep theirs until the broker answers): wait for one to come back
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pid_waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._pid_waiters:
                    self._pid_waiters.remove(fut)
            pid = self._alloc_pid()
        return pid

    def _pid_freed(self) -> None:
        for fut in self._pid_waiters:
            if not fut.done():
                fut.set_result(None)
                return

    async def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None] | None:
        """Wait for room in the in-flight window, send, and return the PUBACK future
        (None for QoS 0) without waiting for it. A QoS other than 0 and 1, or a topic or
        payload MQTT cannot carry, is a :class:`ConfigError` before anything is sent."""
        if qos != 1 and qos != 0:
            raise ConfigError(f"publish: QoS must be 0 or 1, not {qos!r}"
                              + (" (QoS 2 is not supported)" if qos == 2 else ""))
        t = check_topic(topic)
        size = (4 if qos else 2) + len(t) + len(payload)
        if size > MAX_REMAINING:
            raise ConfigError(f"publish: a {len(payload)}-byte payload exceeds MQTT's largest packet (256 MiB)")
        if not self._alive:
            raise ConnectionLost("not connected")
        if not self._can_write.is_set():
            await self._can_write.wait()
        head = bytes((0x30 | (qos << 1) | (1 if retain else 0),)) + varint(size) + U16.pack(len(t)) + t
        if qos == 0:
            self._write(head + payload)
            return None
        window = self._window
        assert window is not None
        if not window.take():
            await window.acquire()
        if not self._alive:
            window.release()  # pass the wake-up on to the next waiter
            raise ConnectionLost("not connected")
        try:
            pid = self._alloc_pid() or await self._new_pid()
        except BaseException:
            window.release()
            raise
        if not self._alive:
            window.release()
            raise ConnectionLost("not connected")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(self._release_slot)
        self._pending[pid] = fut
        self._write(b"".join((head, U16.pack(pid), payload)))
        return fut

    def _release_slot(self, fut: asyncio.Future[None]) -> None:
        if self._window is not None and self._alive:
            self._window.release()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait until the broker acknowledged it."""
        fut = await self.publish_nowait(topic, payload, qos, retain)
        if fut is not None:
            await fut

    async def drain(self) -> None:
        """Wait until every QoS 1 publish sent so far was acknowledged (also those whose
        callers stopped waiting); raise :class:`ConnectionLost` if the connection ends first."""
        while self._pending:
            if not self._alive:
                raise ConnectionLost("not connected")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe; return the granted QoS per filter (0x80 means refused:
        :func:`refused_filters` lists those, and a caller that must not run without them
        raises :class:`~edge.errors.SubscriptionRefused`, as a service does)."""
        encode_subscribe(1, filters)  # checks the filters and QoS before waiting for an id
        if not self._alive:
            raise ConnectionLost("not connected")
        pid = self._alloc_pid() or await self._new_pid()
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subs[pid] = (fut, list(filters))
        self._write(encode_subscribe(pid, filters))
        return await fut

    async def unsubscribe(self, filters: list[str]) -> None:
        """Unsubscribe and wait for the UNSUBACK."""
        encode_unsubscribe(1, filters)
        if not self._alive:
            raise ConnectionLost("not connected")
        pid = self._alloc_pid() or await self._new_pid()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subs[pid] = (fut, None)
        self._write(encode_unsubscribe(pid, filters))
        await fut

    def ack(self, pid: int) -> None:
        """Acknowledge one received QoS 1 message. Its PUBACK goes out once every QoS 1
        message received before it was acknowledged too (MQTT-4.6.0-2); a pid this
        connection did not receive, or acknowledged already, is ignored."""
        rx = self._rx
        n = rx.get(pid)
        if n is None or n < 0:
            return
        rx[pid] = -n
        if n > self._acked_high:
            self._acked_high = n
        if self._rx_order[self._rx_head] == pid:
            self._flush_acks()

    def ack_many(self, pids: list[int]) -> None:
        """Acknowledge many received QoS 1 messages (their PUBACKs in one write, in
        arrival order)."""
        if not isinstance(pids, list):
            pids = list(pids)
        if not pids or not self._rx:
            return
        rx = self._rx
        order = self._rx_order
        head = self._rx_head
        k = len(pids)
        if order[head : head + k] == pids:
            # the common case (the gateway's commit): exactly the oldest ones, in order
            n = abs(rx[pids[-1]])  # arrival numbers grow along the order
            for p in pids:
                del rx[p]
            self._rx_head = head + k
            self._flushed = n
            if n > self._acked_high:
                self._acked_high = n
            if self._alive:
                self._write(struct.pack(f"!{k}I", *[0x40020000 | p for p in pids]))
            if head + k < len(order) and rx[order[head + k]] < 0:
                self._flush_acks()  # acknowledged earlier, held back behind these
            else:
                self._compact_order()
            if self._parked_pings:
                self._release_pings()
            return
        get = rx.get
        high = self._acked_high
        for pid in pids:
            m = get(pid)
            if m is not None and m > 0:
                rx[pid] = -m
                if m > high:
                    high = m
        self._acked_high = high
        if head < len(order) and rx[order[head]] < 0:
            self._flush_acks()

    def _flush_acks(self) -> None:
        """Write the PUBACKs of the acknowledged messages at the front of arrival order."""
        order, rx = self._rx_order, self._rx
        head = start = self._rx_head
        end = len(order)
        last = 0
        while head < end:
            n = rx[order[head]]
            if n > 0:
                break
            last = n
            head += 1
        if head == start:
            return
        done = order[start:head]
        for pid in done:
            del rx[pid]
        self._rx_head = head
        self._compact_order()
        self._flushed = -last
        if self._alive:
            self._write(struct.pack(f"!{len(done)}I", *[0x40020000 | p for p in done]))
        if self._parked_pings:
            self._release_pings()

    def _compact_order(self) -> None:
        head = self._rx_head
        if head > 4096 and head * 2 > len(self._rx_order):
            del self._rx_order[:head]
            self._rx_head = 0

    def _release_pings(self) -> None:
        flushed = self._flushed
        ready = [f for target, f in self._parked_pings if target <= flushed]
        if ready:
            self._parked_pings = [(t, f) for t, f in self._parked_pings if t > flushed]
            for f in ready:
                if not f.done():
                    self._send_ping(f)

    def pause_reading(self) -> None:
        """Deliver no more messages until :meth:`resume_reading` (the receiver has enough
        unacknowledged ones in hand). The socket is not read either, so TCP flow control
        holds the backlog at the broker; deliveries already read wait, in order. Answers
        to this connection's own publishes, subscribes and pings may sit behind the
        backlog, so a receiver whose progress depends on them must publish on another
        connection (edge.Service does). Keepalive pings still go out; how a dead link is
        noticed meanwhile: see the module docstring."""
        if self._transport is not None and not self._reading_paused and self._alive:
            self._reading_paused = True
            self._flow()

    def resume_reading(self) -> None:
        """Deliver again after :meth:`pause_reading`: first what was held, then from the
        socket."""
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            if self._held:
                asyncio.get_running_loop().call_soon(self._deliver_held)
            else:
                self._flow()

    def _deliver_held(self) -> None:
        held = self._held
        if self.on_batch is not None:
            if held and self._alive:
                batch = list(held)
                held.clear()
                self._deliver(batch)
            self._flow()
            return
        on_message = self.on_message
        try:
            while held and not self._reading_paused and self._alive:
                on_message(held.popleft())
        except Exception as e:
            self._fail(f"on_message raised {e!r}", e)
            return
        self._flow()

    def _flow(self) -> None:
        """Read the socket when deliveries are wanted and nothing read is held back."""
        want = not self._reading_paused and not self._held
        t = self._transport
        if t is None or not self._alive:
            return
        if want and self._transport_paused:
            self._transport_paused = False
            self._user_timeout(0)
            if self._pings:
                # their answers may sit unread in the socket: a fresh half keepalive each
                now = time.monotonic()
                self._pings = deque((now, f) for _, f in self._pings)
            self._last_rx = time.monotonic()
            t.resume_reading()
        elif not want and not self._transport_paused:
            self._transport_paused = True
            self._user_timeout(int(self.keepalive * 500))
            t.pause_reading()

    def _user_timeout(self, ms: int) -> None:
        """While paused, let the kernel close a link that stops acknowledging our pings."""
        opt = getattr(socket, "TCP_USER_TIMEOUT", None)
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if opt is None or sock is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, opt, ms)
        except (OSError, AttributeError):  # not TCP (a test transport), or not supported
            pass

    def ping(self) -> asyncio.Future[None]:
        """Send PINGREQ; the future completes at its PINGRESP. The broker handles packets
        in order, so the PINGRESP proves it has processed everything we sent before,
        including the PUBACK of every message acknowledged before this call: if some of
        those are still held back behind an earlier unacknowledged message, the PINGREQ
        goes out once they are written."""
        if not self._alive:
            raise ConnectionLost("not connected")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._acked_high > self._flushed:
            self._parked_pings.append((self._acked_high, fut))
        else:
            self._send_ping(fut)
        return fut

    def _send_ping(self, fut: asyncio.Future[None] | None) -> None:
        self._write(PINGREQ_PACKET)
        self._pings.append((time.monotonic(), fut))

    # ---------------------------------------------------------------- keepalive

    def _due(self) -> float:
        """The earliest moment :meth:`_tick` can have something to do: a ping to send (half
        a keepalive without a complete packet in, or without anything out; only the
        latter while paused) or the oldest ping's answer overdue. Every time this reads
        only moves forward (a ping sent, answered or refreshed on resume is no older than
        the packets it follows), so a timer armed for this moment is never late."""
        half = self.keepalive / 2
        if self._transport_paused:
            return self._last_tx + half
        if self._pings:
            return self._pings[0][0] + half
        return min(self._last_rx, self._last_tx) + half

    def _arm(self) -> None:
        delay = self._due() - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(delay, _MIN_WAKE), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._alive:
            return
        if time.monotonic() >= self._due():
            if self._pings and not self._transport_paused:
                half = self.keepalive / 2
                self._lost(ConnectionLost(
                    f"no answer from {self.url} within the keepalive bound: a PINGREQ without "
                    f"PINGRESP for {half:g} s (keepalive {self.keepalive} s, bound "
                    f"{1.25 * self.keepalive:g} s)"))
                return
            # while paused, answers cannot be read: the ping keeps the broker's side alive
            # (and gives the kernel's TCP_USER_TIMEOUT something to time)
            try:
                self._send_ping(None)
            except ConnectionLost:
                return
        self._arm()

    # ---------------------------------------------------------------- receiving

    def _feed(self, data: bytes) -> None:
        if not self._alive:
            return
        try:
            events = self._decoder.feed(data)
        except ProtocolError as e:
            self._fail(str(e))
            return
        if not events:
            return
        self._last_rx = now = time.monotonic()
        try:
            self._handler(events)
        except ProtocolError as e:
            self._fail(str(e))
            return
        hold = self.read_hold
        if hold and len(events) > self._decoder.controls:  # the read held PUBLISHes
            if (now - self._prev_read < 2 * hold and self._alive and not self._transport_paused
                    and self._hold_timer is None and self._transport is not None):
                # messages are streaming in: let the next ones gather in the socket
                self._transport.pause_reading()
                self._hold_timer = asyncio.get_running_loop().call_later(hold, self._end_hold)
            self._prev_read = now

    def _end_hold(self) -> None:
        self._hold_timer = None
        if self._alive and not self._transport_paused and self._transport is not None:
            self._transport.resume_reading()

    def _handle(self, events: list[Any]) -> None:
        if not self._got_connack and type(events[0]) is not ConnAck:
            raise ProtocolError(f"{_name(events[0])} before CONNACK (MQTT-3.2.0-1)")
        rx = self._rx
        append = self._rx_order.append
        count = self._rx_count
        on_message = self.on_message
        try:
            if self._reading_paused or self._held:
                return self._hold(events)
            for ev in events:
                if type(ev) is not Message:
                    self._control(ev)
                    if not self._alive:
                        return
                    continue
                if ev.qos == 1:
                    pid = ev.pid
                    if pid not in rx:
                        count += 1
                        rx[pid] = count
                        append(pid)
                    elif not ev.dup:
                        raise ProtocolError(
                            f"PUBLISH: packet id {pid} is still in use by an unacknowledged "
                            "PUBLISH (MQTT-2.3.1-2)")
                    # else: the broker sends it again on this connection (NATS does after
                    # ack_wait): deliver it again; one PUBACK answers both
                elif ev.qos:
                    raise ProtocolError(
                        "PUBLISH: QoS 2, above the QoS 1 every subscription of this client "
                        "asks for (MQTT-3.8.4-6)")
                try:
                    on_message(ev)
                except Exception as e:
                    self._fail(f"on_message raised {e!r}", e)
                    return
                if self._reading_paused or not self._alive:
                    break
            else:
                return
        finally:
            self._rx_count = count
        if self._alive:
            self._hold(events[events.index(ev) + 1 :])

    def _hold(self, events: list[Any]) -> None:
        """Paused: keep the PUBLISHes (registered, in order), handle the rest at once."""
        rx = self._rx
        held = self._held
        for ev in events:
            t = type(ev)
            if t is tuple:
                qos, pid, dup = (ev[3] >> 1) & 3, ev[2], ev[3] & 8
            elif t is Message:
                qos, pid, dup = ev.qos, ev.pid, ev.dup
            else:
                self._control(ev)
                if not self._alive:
                    return
                continue
            if qos:
                if qos != 1:
                    raise ProtocolError(
                        "PUBLISH: QoS 2, above the QoS 1 every subscription of this client "
                        "asks for (MQTT-3.8.4-6)")
                if pid not in rx:
                    self._rx_count += 1
                    rx[pid] = self._rx_count
                    self._rx_order.append(pid)
                elif not dup:
                    raise ProtocolError(
                        f"PUBLISH: packet id {pid} is still in use by an unacknowledged "
                        "PUBLISH (MQTT-2.3.1-2)")
            held.append(ev)

    def _handle_batch(self, events: list[Any]) -> None:
        """With ``on_batch``: consecutive PUBLISHes of a read go to the receiver in one
        list; a packet of another type between them is handled in its place."""
        if not self._got_connack and type(events[0]) is not ConnAck:
            raise ProtocolError(f"{_name(events[0])} before CONNACK (MQTT-3.2.0-1)")
        if self._reading_paused or self._held:
            return self._hold(events)
        if not self._decoder.controls:
            self._take(events)  # the common case: only PUBLISHes
            return
        run: list[RawPublish] = []
        for k, ev in enumerate(events):
            if type(ev) is tuple:
                run.append(ev)
                continue
            if run:
                self._take(run)
                run = []
                if not self._alive:
                    return
                if self._reading_paused:
                    return self._hold(events[k:])
            self._control(ev)
            if not self._alive:
                return
        if run:
            self._take(run)

    def _take(self, batch: list[RawPublish]) -> None:
        """Register the batch's QoS 1 packet ids in arrival order (for PUBACK order and
        MQTT-2.3.1-2), then hand it to ``on_batch``. At a protocol violation the
        PUBLISHes before it are delivered, then the connection fails."""
        rx = self._rx
        k = len(batch)
        pids = list(map(_PID, batch))
        if set(map(_FIRST_BYTE, batch)) <= _QOS1_NEW:
            c = self._rx_count
            new = dict(zip(pids, range(c + 1, c + 1 + k), strict=True))
            if len(new) == k and rx.keys().isdisjoint(new):
                rx.update(new)
                self._rx_order += pids
                self._rx_count = c + k
                self._deliver(batch)
                return
        count = self._rx_count
        append = self._rx_order.append
        for i, (_, _, pid, first) in enumerate(batch):
            qos = (first >> 1) & 3
            why = None
            if qos == 1:
                if pid not in rx:
                    count += 1
                    rx[pid] = count
                    append(pid)
                elif not first & 8:
                    why = (f"PUBLISH: packet id {pid} is still in use by an unacknowledged "
                           "PUBLISH (MQTT-2.3.1-2)")
                # else: the broker sends it again on this connection: deliver it again;
                # one PUBACK answers both
            elif qos:
                why = ("PUBLISH: QoS 2, above the QoS 1 every subscription of this client "
                       "asks for (MQTT-3.8.4-6)")
            if why is not None:
                self._rx_count = count
                if i:
                    self._deliver(batch[:i])
                raise ProtocolError(why)
        self._rx_count = count
        self._deliver(batch)

    def _deliver(self, batch: list[RawPublish]) -> None:
        assert self.on_batch is not None
        try:
            self.on_batch(batch)
        except Exception as e:
            self._fail(f"on_batch raised {e!r}", e)

    def _control(self, ev: Any) -> None:
        t = type(ev)
        if t is ConnAck:
            if self._got_connack:
                raise ProtocolError("CONNACK: a second CONNACK on one connection (MQTT-3.2.0-1)")
            self._got_connack = True
            if self._connack is not None and not self._connack.done():
                self._connack.set_result((ev.session_present, ev.return_code))
            return
        if not self._alive:
            return
        if not self._got_connack:
            raise ProtocolError(f"{_name(ev)} before CONNACK (MQTT-3.2.0-1)")
        if t is PubAck:
            fut = self._pending.pop(ev.pid, None)
            if fut is None:
                raise ProtocolError(f"PUBACK: packet id {ev.pid} answers no PUBLISH of ours (MQTT-2.3.1)")
            if not fut.done():
                fut.set_result(None)
            if not self._pending and self._drain_waiters:
                waiters, self._drain_waiters = self._drain_waiters, []
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
            if self._pid_waiters:
                self._pid_freed()
        elif t is PingResp:
            if not self._pings:
                raise ProtocolError("PINGRESP: no PINGREQ outstanding (MQTT-3.12.4)")
            _, waiter = self._pings.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif t is SubAck:
            entry = self._subs.get(ev.pid)
            if entry is None or entry[1] is None:
                raise ProtocolError(f"SUBACK: packet id {ev.pid} answers no SUBSCRIBE of ours (MQTT-3.9.3)")
            sub_fut, filters = entry[0], entry[1] or []
            if len(ev.codes) != len(filters):
                raise ProtocolError(
                    f"SUBACK: {len(ev.codes)} return codes for {len(filters)} topic filters (MQTT-3.9.3-1)")
            for (_, q), g in zip(filters, ev.codes, strict=True):
                if g != 0x80 and g > q:
                    raise ProtocolError(f"SUBACK: granted QoS {g} above the QoS {q} asked for (MQTT-3.8.4-6)")
            del self._subs[ev.pid]
            if not sub_fut.done():
                sub_fut.set_result(list(ev.codes))
            if self._pid_waiters:
                self._pid_freed()
        elif t is UnsubAck:
            entry = self._subs.get(ev.pid)
            if entry is None or entry[1] is not None:
                raise ProtocolError(f"UNSUBACK: packet id {ev.pid} answers no UNSUBSCRIBE of ours (MQTT-3.11.3)")
            del self._subs[ev.pid]
            if not entry[0].done():
                entry[0].set_result(None)
            if self._pid_waiters:
                self._pid_freed()

