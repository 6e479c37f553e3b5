"""A small asyncio MQTT 3.1.1 client built for throughput and explicit acknowledgement.

One :class:`MQTTClient` is one connection. It does what edgeferry needs and no more:
QoS 0 and 1, persistent or clean sessions, a last will, keepalive that notices a silent
link, a window of in-flight QoS 1 publishes, and *manual* acknowledgement of received
QoS 1 messages (the gateway acknowledges only after its store committed them).

Received messages are handed to a plain callback, packet by packet, in the order the
broker sent them; parsing works on whole socket reads so that a burst of small publishes
costs a few microseconds each. Reconnecting is the caller's job: make a new client.

The silent-link bound: a PINGREQ goes out when nothing was received for
``keepalive / 2`` seconds (or nothing was sent for as long); if still nothing arrives
within another ``keepalive / 2``, the connection is closed with :class:`ConnectionLost`.
The check runs every ``keepalive / 8``, so a blackholed link is noticed within
``1.25 * keepalive`` seconds.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from edge._tls import TLSOptions, explain, read_secret
from edge.errors import ConfigError, ConnectError, ConnectionLost, ProtocolError

__all__ = ["BrokerURL", "Message", "MQTTClient", "Will", "parse_url"]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

_PUBACK = struct.Struct("!BBH")
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where a broker is: parsed from ``mqtt://[user[:password]@]host[:port]``;
    ``tls_options`` say how to check it and who we are (for ``mqtts://``)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    tls_options: TLSOptions | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for error messages and logs)."""
    head, at, rest = url.rpartition("@")
    scheme, sep, userinfo = head.rpartition("//")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{rest}"


def parse_url(url: str) -> BrokerURL:
    """Parse a broker URL, raising :class:`ConfigError` with one clear line if it is bad."""
    shown = _redact(url) if isinstance(url, str) else url
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"broker URL {shown!r} is not of the form mqtt://HOST:PORT")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ConfigError(f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {shown!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {shown!r} must not have a path or query")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"broker URL {shown!r} has an invalid port") from None
    tls = parts.scheme == "mqtts"
    if port is None:
        port = 8883 if tls else 1883
    if not 0 < port < 65536:
        raise ConfigError(f"broker URL {shown!r} has an invalid port")
    return BrokerURL(
        parts.hostname,
        port,
        tls,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes when the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Message:
    """One received PUBLISH. ``pid`` is 0 for QoS 0."""

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "pid")

    def __init__(
        self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, pid: int
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.pid = pid

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, pid={self.pid})"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, pid: int, dup: bool = False) -> bytes:
    """Encode one PUBLISH packet."""
    t = topic.encode()
    body_len = 2 + len(t) + (2 if qos else 0) + len(payload)
    head = bytes((0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0),)) + _varint(body_len)
    if qos:
        return b"".join((head, len(t).to_bytes(2, "big"), t, pid.to_bytes(2, "big"), payload))
    return b"".join((head, len(t).to_bytes(2, "big"), t, payload))


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


class MQTTClient:
    """One MQTT 3.1.1 connection. Use as ``async with MQTTClient(...) as c:`` or call
    :meth:`connect` and :meth:`close` yourself.

    ``on_message`` is called synchronously for every PUBLISH received, in order; for
    QoS 1 the receiver must later call :meth:`ack` (or :meth:`ack_many`) with ``msg.pid``.
    ``max_inflight`` bounds QoS 1 publishes awaiting PUBACK; :meth:`publish` waits for room.
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
        max_inflight: int = 64,
        max_packet_bytes: int = 16 * 1024 * 1024,
        connect_timeout: float = 10.0,
        tls: TLSOptions | None = None,
        password_file: str | None = None,
    ) -> None:
        self.url = url if isinstance(url, BrokerURL) else parse_url(url)
        # for mqtts://: files read again at every connect (edge/_tls.py)
        self.tls = tls or self.url.tls_options
        self.password_file = password_file  # read again at every connect, too
        self.client_id = client_id
        self.clean_session = clean_session
        self.keepalive = max(1, int(keepalive))
        self.will = will
        self.on_message = on_message or (lambda m: None)
        self.max_inflight = max_inflight
        self.max_packet_bytes = max_packet_bytes
        self.connect_timeout = connect_timeout
        self.session_present = False
        self._transport: asyncio.Transport | None = None
        self._rest = b""
        self._connack: asyncio.Future[tuple[bool, int]] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_pid = 0
        self._window: asyncio.Semaphore | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._last_rx = self._last_tx = time.monotonic()
        self._ping_sent: float | None = None
        self._ping_waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._entered = False
        self._reading_paused = False  # the receiver asked for no more deliveries
        self._transport_paused = False  # the socket is not being read
        # PUBLISH packets read after a pause (the rest of that read), raw and in order;
        # other packets behind them are handled at once
        self._held: deque[tuple[bytes, int]] = deque()

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
        self._window = asyncio.Semaphore(self.max_inflight)
        tls = (self.tls or TLSOptions()) if self.url.tls else None
        if self.password_file:
            self.url = replace(self.url, password=read_secret(self.password_file))
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: _Protocol(self), self.url.host, self.url.port,
                    ssl=tls.context() if tls else None,
                    server_hostname=tls.server_name if tls and tls.server_name else None,
                )
                self._write(self._connect_packet())
                present, code = await self._connack
        except TimeoutError:
            self._abort()
            raise ConnectError(f"{self.url}: no CONNACK within {self.connect_timeout:g} s") from None
        except OSError as e:
            self._abort()
            raise ConnectError(f"{self.url}: {explain(e.strerror or e)[1] if tls else e.strerror or e}") from None
        except ConnectionLost as e:
            self._abort()
            raise ConnectError(f"{self.url}: {explain(e)[1] if tls else e}") from None
        if code:
            self._abort()
            reason = _CONNACK_CODES.get(code, f"code {code}")
            raise ConnectError(f"{self.url} refused the connection: {reason}", code)
        self.session_present = present
        self._timer = loop.call_later(self.keepalive / 8, self._tick)
        return present

    async def close(self) -> None:
        """Send DISCONNECT (the will is discarded) and close the connection."""
        if self._transport is not None and self.connected:
            self._write(_DISCONNECT)
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(exc)
            self._connack.exception()  # mark retrieved; connect() re-raises it
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(exc)
            self._closed.exception()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._held.clear()  # unacknowledged: the broker sends them again next session
        self._can_write.set()
        if self._window is not None:
            # wake every publisher waiting for room; they will see the closed connection
            for _ in range(self.max_inflight):
                self._window.release()

    def _connect_packet(self) -> bytes:
        flags = 0x02 if self.clean_session else 0
        payload = [_utf8(self.client_id)]
        if self.will is not None:
            flags |= 0x04 | (self.will.qos << 3) | (0x20 if self.will.retain else 0)
            payload.append(_utf8(self.will.topic))
            payload.append(len(self.will.payload).to_bytes(2, "big") + self.will.payload)
        if self.url.username is not None:
            flags |= 0x80
            payload.append(_utf8(self.url.username))
            if self.url.password is not None:
                flags |= 0x40
                payload.append(_utf8(self.url.password))
        body = b"\x00\x04MQTT\x04" + bytes((flags,)) + self.keepalive.to_bytes(2, "big")
        body += b"".join(payload)
        return b"\x10" + _varint(len(body)) + body

    # ---------------------------------------------------------------- sending

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionLost("not connected")
        self._transport.write(data)
        self._last_tx = time.monotonic()

    def _alloc_pid(self) -> int:
        pid = self._next_pid
        pending = self._pending
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in pending:
                self._next_pid = pid
                return pid

    async def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None] | None:
        """Wait for room in the in-flight window, send, and return the PUBACK future
        (None for QoS 0) without waiting for it."""
        if not self.connected:
            raise ConnectionLost("not connected")
        if not self._can_write.is_set():
            await self._can_write.wait()
        if qos == 0:
            self._write(encode_publish(topic, payload, 0, retain, 0))
            return None
        assert self._window is not None
        await self._window.acquire()
        if not self.connected:
            raise ConnectionLost("not connected")
        pid = self._alloc_pid()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(self._release_slot)
        self._pending[pid] = fut
        self._write(encode_publish(topic, payload, qos, retain, pid))
        return fut

    def _release_slot(self, fut: asyncio.Future[None]) -> None:
        if self._window is not None and self.connected:
            self._window.release()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait until the broker acknowledged it."""
        fut = await self.publish_nowait(topic, payload, qos, retain)
        if fut is not None:
            await fut

    async def drain(self) -> None:
        """Wait until every QoS 1 publish sent so far was acknowledged."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()))

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe; return the granted QoS per filter (0x80 means refused)."""
        pid = self._alloc_pid()
        body = pid.to_bytes(2, "big") + b"".join(_utf8(f) + bytes((q,)) for f, q in filters)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[pid] = fut  # type: ignore[assignment]
        self._write(b"\x82" + _varint(len(body)) + body)
        granted = await fut
        return list(granted)

    def ack(self, pid: int) -> None:
        """Acknowledge one received QoS 1 message (PUBACK)."""
        if self.connected:
            self._write(_PUBACK.pack(0x40, 2, pid))

    def ack_many(self, pids: list[int]) -> None:
        """Acknowledge many received QoS 1 messages in one write."""
        if pids and self.connected:
            pack = _PUBACK.pack
            self._write(b"".join([pack(0x40, 2, p) for p in pids]))

    def pause_reading(self) -> None:
        """Deliver no more messages until :meth:`resume_reading` (the receiver has enough
        unacknowledged ones in hand). The socket is not read either, so TCP flow control
        holds the backlog at the broker; deliveries already read wait as bytes, in order.
        Answers to this connection's own publishes, subscribes and pings may sit behind
        the backlog, so a receiver whose progress depends on them must publish on another
        connection (edge.Service does). Keepalive pings still go out, and a paused
        connection is not declared silent."""
        if self._transport is not None and not self._reading_paused and self.connected:
            self._reading_paused = True
            self._flow()

    def resume_reading(self) -> None:
        """Deliver again after :meth:`pause_reading`: first what was held, then from the
        socket."""
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            self._last_rx = time.monotonic()
            if self._held:
                asyncio.get_running_loop().call_soon(self._deliver_held)
            else:
                self._flow()

    def _deliver_held(self) -> None:
        held = self._held
        try:
            while held and not self._reading_paused and self.connected:
                packet, i = held.popleft()
                self._publish_in(packet, packet[0], i, len(packet))
        except UnicodeDecodeError as e:
            self._lost(ConnectionLost(f"protocol error from {self.url}: {e}"))
            return
        self._flow()

    def _flow(self) -> None:
        """Read the socket when deliveries are wanted and nothing read is held back."""
        want = not self._reading_paused and not self._held
        t = self._transport
        if t is None or not self.connected:
            return
        if want and self._transport_paused:
            self._transport_paused = False
            t.resume_reading()
        elif not want and not self._transport_paused:
            self._transport_paused = True
            t.pause_reading()

    def ping(self) -> asyncio.Future[None]:
        """Send PINGREQ; the future completes at PINGRESP. The broker handles packets in
        order, so a PINGRESP proves it has processed everything we sent before."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ping_waiters.append(fut)
        self._write(_PINGREQ)
        if self._ping_sent is None:
            self._ping_sent = time.monotonic()
        return fut

    # ---------------------------------------------------------------- keepalive

    def _tick(self) -> None:
        now = time.monotonic()
        half = self.keepalive / 2
        if self._transport_paused:
            # we are not reading, so answers cannot arrive: keep the broker's side alive
            if now - self._last_tx > half:
                try:
                    self._write(_PINGREQ)
                except ConnectionLost:
                    return
            self._timer = asyncio.get_running_loop().call_later(self.keepalive / 8, self._tick)
            return
        if self._ping_sent is not None and now - self._ping_sent > half and now - self._last_rx > half:
            self._lost(ConnectionLost(f"no answer from {self.url} within the keepalive ({self.keepalive} s)"))
            return
        if self._ping_sent is None and (now - self._last_rx > half or now - self._last_tx > half):
            try:
                self._write(_PINGREQ)
            except ConnectionLost:
                return
            self._ping_sent = now
        self._timer = asyncio.get_running_loop().call_later(self.keepalive / 8, self._tick)

    # ---------------------------------------------------------------- receiving

    def _feed(self, data: bytes) -> None:
        self._last_rx = time.monotonic()
        if self._rest:
            data = self._rest + data
        try:
            pos = self._packets(data)
        except (ProtocolError, UnicodeDecodeError, IndexError) as e:
            self._rest = b""
            self._lost(ConnectionLost(f"protocol error from {self.url}: {e}"))
            return
        self._rest = data[pos:] if pos < len(data) else b""

    def _packets(self, data: bytes) -> int:
        """Handle the complete packets in ``data``; return where the incomplete one starts."""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            first = data[pos]
            # remaining length (1..4 bytes)
            i = pos + 1
            length = 0
            mult = 1
            while True:
                if i >= n:
                    return pos
                byte = data[i]
                length += (byte & 0x7F) * mult
                i += 1
                if byte < 0x80:
                    break
                mult *= 128
                if mult > 128**3:
                    raise ProtocolError("malformed remaining length")
            end = i + length
            if end > n:
                if length > self.max_packet_bytes:
                    raise ProtocolError(f"packet of {length} bytes exceeds the limit")
                return pos
            ptype = first >> 4
            if ptype == PUBLISH:
                if self._reading_paused or self._held:
                    self._held.append((data[pos:end], i - pos))
                else:
                    self._publish_in(data, first, i, end)
            elif ptype == PUBACK or ptype == SUBACK or ptype == UNSUBACK:
                pid = (data[i] << 8) | data[i + 1]
                fut = self._pending.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(data[i + 2 : end] if ptype == SUBACK else None)
            elif ptype == PINGRESP:
                self._ping_sent = None
                waiters, self._ping_waiters = self._ping_waiters, []
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
            elif ptype == CONNACK:
                if self._connack is not None and not self._connack.done():
                    self._connack.set_result((bool(data[i] & 1), data[i + 1]))
            else:
                raise ProtocolError(f"unexpected packet type {ptype} from the broker")
            pos = end
        return pos

    def _publish_in(self, data: bytes, first: int, i: int, end: int) -> None:
        """Hand the PUBLISH packet ``data[..end]`` (its variable header at ``i``) over."""
        tlen = (data[i] << 8) | data[i + 1]
        t_end = i + 2 + tlen
        topic = data[i + 2 : t_end].decode()
        qos = (first >> 1) & 3
        if qos:
            pid = (data[t_end] << 8) | data[t_end + 1]
            payload = data[t_end + 2 : end]
        else:
            pid = 0
            payload = data[t_end:end]
        self.on_message(Message(topic, payload, qos, bool(first & 1), bool(first & 8), pid))

