"""MQTT 3.1.1 packets, client side, with no I/O: events in, bytes out; bytes in, events out.

The encoders check every field before building a packet (string and binary lengths, QoS,
packet ids, keepalive, topic names and filters, UTF-8 per MQTT-1.5.3) and raise
:class:`~edge.errors.ConfigError` with one clear line. :class:`Decoder` takes the bytes a
broker sends, as they arrive, and returns the complete packets as events: a
:class:`Message` per PUBLISH, :class:`ConnAck`, :class:`PubAck`, :class:`SubAck`,
:class:`UnsubAck` and :data:`PINGRESP_EVENT`. It checks each packet against its type's
exact rules and raises :class:`~edge.errors.ProtocolError` naming the packet and the rule
at the first violation; nothing after it is returned. The decoder knows packets, not the
conversation: whether a packet id is one we are waiting for is the connection's business
(edge/mqtt.py).

What the decoder refuses (each a ProtocolError):

* packet types a client never receives (CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
  DISCONNECT, the reserved 0 and 15) and the QoS 2 flow (PUBREC, PUBREL, PUBCOMP: this
  client never uses QoS 2), as soon as the first byte arrives;
* fixed-header flags other than the ones MQTT-2.2.2 prescribes; a remaining length longer
  than 4 bytes or not in its shortest form; a remaining length above ``max_packet_bytes``,
  as soon as it is known (before any of the packet is buffered);
* CONNACK, PUBACK, UNSUBACK other than 2 bytes long, PINGRESP other than 0; CONNACK
  reserved flag bits, an unknown return code, or session present with a refusal;
* SUBACK shorter than 3 bytes or with a return code other than 0, 1, 2 and 0x80;
* a packet id of 0 (PUBACK, SUBACK, UNSUBACK, PUBLISH with QoS 1 or 2);
* PUBLISH with QoS 3, DUP set on QoS 0, a topic that runs past the end of the packet, an
  empty topic, a topic with ``+`` or ``#``, or a topic that is not well-formed UTF-8 or
  holds U+0000 (Python's UTF-8 decoder refuses encoded surrogates).

Buffering: a read that holds only whole packets is parsed where it lies. A packet split
across reads is collected in one bytearray (appended to, never copied whole per read) and
parsed once complete; the buffer never holds more than one packet's prefix plus one read.

The C fast path: a raw decoder hands runs of ordinary PUBLISHes (QoS 0/1, legal flags, a
topic already checked and cached) to ``parse_publishes`` of edge/_cparse.c when that
optional extension is built, which stops at any other packet for the loop below; the
rules and their messages live here only (docs/decisions.md). ``EDGEFERRY_PURE_PYTHON=1``
forces the pure Python path; :data:`PARSE_PATH` says which one runs.

Size: the rules of every packet type a client sends or receives, in one place to check
against the specification; the decoder's loop is one function because it is the hot path
of everything (a function call per packet costs measurably).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable

from edge.errors import ConfigError, ProtocolError

__all__ = [
    "DISCONNECT_PACKET",
    "PINGREQ_PACKET",
    "PINGRESP_EVENT",
    "ConnAck",
    "Decoder",
    "Message",
    "PingResp",
    "PubAck",
    "RawPublish",
    "SubAck",
    "UnsubAck",
    "check_filter",
    "check_topic",
    "encode_connect",
    "encode_puback",
    "encode_pubacks",
    "encode_publish",
    "encode_subscribe",
    "encode_unsubscribe",
    "raw_message",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

NAMES = {
    0: "reserved type 0", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK",
    5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK",
    10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT",
    15: "reserved type 15",
}

MAX_REMAINING = 268_435_455
"""The largest remaining length four bytes can encode (MQTT-2.2.3)."""

MAX_FIELD = 65_535
"""The longest string or binary field (a two-byte length)."""

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

U16 = struct.Struct("!H")
PUBACK_STRUCT = struct.Struct("!BBH")
_SUBACK_CODES = frozenset((0, 1, 2, 0x80))

# first byte -> None (fine), or why a client refuses it; PUBLISH checks its own flags
_FIRST: list[str | None] = []
for _b in range(256):
    _t, _f = _b >> 4, _b & 15
    if _t == PUBLISH:
        _FIRST.append(None if (_f >> 1) & 3 != 3 else "PUBLISH: QoS 3 is malformed (MQTT-3.3.1-4)")
    elif _t in (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP):
        _FIRST.append(None if _f == 0 else
                      f"{NAMES[_t]}: fixed header flags {_f:#x}, must be 0 (MQTT-2.2.2-1)")
    elif _t in (PUBREC, PUBREL, PUBCOMP):
        _FIRST.append(f"{NAMES[_t]}: part of the QoS 2 flow, which this client never uses")
    elif _t in (0, 15):
        _FIRST.append(f"{NAMES[_t]}: a reserved packet type (MQTT-2.2.1)")
    else:
        _FIRST.append(f"{NAMES[_t]}: a server never sends this packet type to a client")
del _b, _t, _f

# the exact remaining length of the fixed-size packets
_EXACT = {CONNACK: 2, PUBACK: 2, UNSUBACK: 2, PINGRESP: 0}


# ------------------------------------------------------------------ events


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


class ConnAck:
    __slots__ = ("session_present", "return_code")

    def __init__(self, session_present: bool, return_code: int) -> None:
        self.session_present = session_present
        self.return_code = return_code

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConnAck) and (self.session_present, self.return_code) == (
            other.session_present, other.return_code)

    def __repr__(self) -> str:
        return f"ConnAck(session_present={self.session_present}, return_code={self.return_code})"


class PubAck:
    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __eq__(self, other: object) -> bool:
        return type(other) is PubAck and other.pid == self.pid

    def __repr__(self) -> str:
        return f"PubAck({self.pid})"


class UnsubAck(PubAck):
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is UnsubAck and other.pid == self.pid

    def __repr__(self) -> str:
        return f"UnsubAck({self.pid})"


class SubAck:
    __slots__ = ("pid", "codes")

    def __init__(self, pid: int, codes: list[int]) -> None:
        self.pid = pid
        self.codes = codes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubAck) and (self.pid, self.codes) == (other.pid, other.codes)

    def __repr__(self) -> str:
        return f"SubAck({self.pid}, {self.codes})"


class PingResp:
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PingResp)

    def __repr__(self) -> str:
        return "PingResp()"


PINGRESP_EVENT = PingResp()

Event = Message | ConnAck | PubAck | SubAck | PingResp

RawPublish = tuple[str, bytes, int, int]
"""A PUBLISH from a ``Decoder(raw=True)``: (topic, payload, packet id or 0, the fixed
header's first byte)."""


def raw_message(p: RawPublish) -> Message:
    """The :class:`Message` of a raw PUBLISH tuple."""
    first = p[3]
    return Message(p[0], p[1], (first >> 1) & 3, first & 1 == 1, first & 8 == 8, p[2])


# ------------------------------------------------------------------ encoding


def varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _text(what: str, s: str, *, empty: bool = True) -> bytes:
    """``s`` as an MQTT UTF-8 string field's bytes (without the length), checked."""
    if not isinstance(s, str):
        raise ConfigError(f"{what} must be a string, not {type(s).__name__}")
    try:
        b = s.encode()
    except UnicodeEncodeError:
        raise ConfigError(
            f"{what} {s[:40]!r} holds a lone surrogate, not allowed in MQTT strings (MQTT-1.5.3-1)") from None
    if len(b) > MAX_FIELD:
        raise ConfigError(f"{what} is {len(b)} bytes in UTF-8; MQTT allows at most 65535")
    if not b and not empty:
        raise ConfigError(f"{what} must not be empty")
    if b"\x00" in b:
        raise ConfigError(f"{what} {s[:40]!r} holds U+0000, not allowed in MQTT strings (MQTT-1.5.3-2)")
    return b


def _field(b: bytes) -> bytes:
    return U16.pack(len(b)) + b


def _binary(what: str, b: bytes) -> bytes:
    if not isinstance(b, bytes | bytearray | memoryview):
        raise ConfigError(f"{what} must be bytes, not {type(b).__name__}")
    b = bytes(b)
    if len(b) > MAX_FIELD:
        raise ConfigError(f"{what} is {len(b)} bytes; MQTT allows at most 65535")
    return _field(b)


def _qos(what: str, qos: int) -> int:
    if qos not in (0, 1):
        if qos == 2:
            raise ConfigError(f"{what}: QoS 2 is not supported (use 0 or 1)")
        raise ConfigError(f"{what}: QoS must be 0 or 1, not {qos!r}")
    return qos


def check_pid(pid: int) -> int:
    if not isinstance(pid, int) or not 0 < pid <= 65535:
        raise ConfigError(f"packet id must be 1..65535, not {pid!r}")
    return pid


def check_topic(topic: str) -> bytes:
    """A topic name for PUBLISH (or a will): non-empty, no wildcards, valid MQTT UTF-8."""
    b = _text("topic", topic, empty=False)
    if b"+" in b or b"#" in b:
        raise ConfigError(f"topic {topic[:80]!r} holds a wildcard; only filters may (MQTT-3.3.2-2)")
    return b


def check_filter(flt: str) -> bytes:
    """A topic filter for SUBSCRIBE or UNSUBSCRIBE: non-empty, ``#`` only as the whole
    last level, ``+`` only as a whole level, valid MQTT UTF-8."""
    b = _text("topic filter", flt, empty=False)
    if b"+" in b or b"#" in b:
        levels = flt.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ConfigError(f"topic filter {flt!r}: '#' must be the whole last level (MQTT-4.7.1-2)")
            if "+" in level and level != "+":
                raise ConfigError(f"topic filter {flt!r}: '+' must be a whole level (MQTT-4.7.1-3)")
    return b


def encode_connect(
    client_id: str,
    *,
    clean_session: bool,
    keepalive: int,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | bytes | None = None,
) -> bytes:
    """CONNECT; ``will`` is (topic, payload, qos, retain)."""
    cid = _text("client id", client_id)
    if not cid and not clean_session:
        raise ConfigError("an empty client id needs a clean session (MQTT-3.1.3-7)")
    if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise ConfigError(f"keepalive must be 0..65535 s, not {keepalive!r}")
    flags = 0x02 if clean_session else 0
    payload = [_field(cid)]
    if will is not None:
        topic, wpayload, wqos, wretain = will
        flags |= 0x04 | (_qos("will", wqos) << 3) | (0x20 if wretain else 0)
        payload.append(_field(check_topic(topic)))
        payload.append(_binary("will payload", wpayload))
    if username is not None:
        flags |= 0x80
        payload.append(_field(_text("user name", username)))
    if password is not None:
        if username is None:
            raise ConfigError("a password needs a user name (MQTT-3.1.2-22)")
        flags |= 0x40
        pw = password.encode() if isinstance(password, str) else password
        payload.append(_binary("password", pw))
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + U16.pack(keepalive) + b"".join(payload)
    return b"\x10" + varint(len(body)) + body


def encode_publish(
    topic: str, payload: bytes, qos: int, retain: bool, pid: int, dup: bool = False
) -> bytes:
    """PUBLISH (QoS 0 or 1; ``pid`` is ignored for QoS 0)."""
    t = check_topic(topic)
    if qos:
        if qos != 1:
            _qos("publish", qos)
        if not 0 < pid <= 65535:
            check_pid(pid)
        body_len = 4 + len(t) + len(payload)
    else:
        if dup:
            raise ConfigError("publish: DUP must be 0 for QoS 0 (MQTT-3.3.1-2)")
        body_len = 2 + len(t) + len(payload)
    if body_len > MAX_REMAINING:
        raise ConfigError(f"publish: a {len(payload)}-byte payload exceeds MQTT's largest packet (256 MiB)")
    head = bytes((0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0),)) + varint(body_len)
    if qos:
        return b"".join((head, U16.pack(len(t)), t, U16.pack(pid), payload))
    return b"".join((head, U16.pack(len(t)), t, payload))


def encode_puback(pid: int) -> bytes:
    return PUBACK_STRUCT.pack(0x40, 2, check_pid(pid))


def encode_pubacks(pids: Iterable[int]) -> bytes:
    """Many PUBACKs in one buffer (ids already known to be valid: received ones)."""
    pack = PUBACK_STRUCT.pack
    return b"".join([pack(0x40, 2, p) for p in pids])


def encode_subscribe(pid: int, filters: list[tuple[str, int]]) -> bytes:
    check_pid(pid)
    if not filters:
        raise ConfigError("subscribe needs at least one topic filter (MQTT-3.8.3-3)")
    body = U16.pack(pid) + b"".join(
        _field(check_filter(f)) + bytes((_qos(f"subscribe {f!r}", q),)) for f, q in filters)
    return b"\x82" + varint(len(body)) + body


def encode_unsubscribe(pid: int, filters: list[str]) -> bytes:
    check_pid(pid)
    if not filters:
        raise ConfigError("unsubscribe needs at least one topic filter (MQTT-3.10.3-2)")
    body = U16.pack(pid) + b"".join(_field(check_filter(f)) for f in filters)
    return b"\xa2" + varint(len(body)) + body


def encode_event(ev: Event) -> bytes:
    """The bytes a broker sends for ``ev`` (for tests and fake brokers)."""
    if isinstance(ev, Message):
        t = ev.topic.encode()
        body = _field(t) + (U16.pack(ev.pid) if ev.qos else b"") + ev.payload
        first = 0x30 | (8 if ev.dup else 0) | (ev.qos << 1) | (1 if ev.retain else 0)
        return bytes((first,)) + varint(len(body)) + body
    if isinstance(ev, ConnAck):
        return bytes((0x20, 2, int(ev.session_present), ev.return_code))
    if isinstance(ev, UnsubAck):
        return b"\xb0\x02" + U16.pack(ev.pid)
    if isinstance(ev, PubAck):
        return b"\x40\x02" + U16.pack(ev.pid)
    if isinstance(ev, SubAck):
        body = U16.pack(ev.pid) + bytes(ev.codes)
        return b"\x90" + varint(len(body)) + body
    return b"\xd0\x00"


# ------------------------------------------------------------------ decoding


def _accelerator() -> Callable[[bytes, int, int, dict[bytes, str], list[Event]], int] | None:
    """edge/_cparse.c's fast path for raw PUBLISHes, unless it was not built (no compiler
    at install time) or ``EDGEFERRY_PURE_PYTHON=1`` asks for the pure Python path."""
    if os.environ.get("EDGEFERRY_PURE_PYTHON") == "1":
        return None
    try:
        from edge._cparse import parse_publishes
    except ImportError:
        return None
    return parse_publishes  # type: ignore[no-any-return]


_fast_publishes = _accelerator()
PARSE_PATH = "c" if _fast_publishes is not None else "python"
"""Which parse path a raw decoder takes: "c" (edge/_cparse.c) or "python"."""


class Decoder:
    """Bytes from a broker in (:meth:`feed`, as they arrive), events out.

    With ``raw=True`` each PUBLISH is a :data:`RawPublish` tuple instead of a
    :class:`Message`; every packet is checked exactly as otherwise.

    After a :class:`ProtocolError` the decoder is spent: the connection must close.
    """

    __slots__ = ("max_packet_bytes", "raw", "controls", "_buf", "_topics", "_failed", "_fast")

    def __init__(self, max_packet_bytes: int = 16 * 1024 * 1024, *, raw: bool = False) -> None:
        if not 0 < max_packet_bytes <= MAX_REMAINING:
            raise ConfigError(f"max_packet_bytes must be 1..{MAX_REMAINING}, not {max_packet_bytes!r}")
        self.max_packet_bytes = max_packet_bytes
        # raw: a PUBLISH comes out as a plain tuple (topic, payload, pid, first byte)
        # instead of a Message: the same checks, no object per message (the gateway's
        # batch path); qos is (first >> 1) & 3, retain first & 1, dup first & 8
        self.raw = raw
        self.controls = 0  # packets other than PUBLISH in the last feed's events
        self._buf = bytearray()  # the start of a packet that has not arrived whole yet
        self._topics: dict[bytes, str] = {}  # topic bytes already checked -> str
        self._failed = False
        # the C fast path takes the runs of ordinary PUBLISHes whose topic is already in
        # self._topics and stops at anything else, which the loop below handles as ever
        self._fast = _fast_publishes if raw else None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes; return the packets they complete, in order."""
        if self._failed:
            raise ProtocolError("the decoder already failed: the connection must close")
        self.controls = 0
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        start = 0
        head: list[Event] = []
        if buf:
            # a packet began in an earlier read: complete it with the bytes it still needs
            # (never a copy of the whole read), then parse the rest of the read in place
            n = len(data)
            total = self._need(buf, 0, len(buf))
            while total is None and start < n:  # its fixed header first, a byte at a time
                buf.append(data[start])
                start += 1
                total = self._need(buf, 0, len(buf))
            if total is None or total - len(buf) > n - start:
                buf += memoryview(data)[start:]
                return []  # still incomplete
            end = start + total - len(buf)
            buf += memoryview(data)[start:end]
            start = end
            try:
                head, _ = self._parse(bytes(buf), 0)
            except ProtocolError:
                self._failed = True
                buf.clear()
                raise
            buf.clear()
        try:
            events, pos = self._parse(data, start)
        except ProtocolError:
            self._failed = True
            buf.clear()
            raise
        if pos < len(data):
            buf += memoryview(data)[pos:]
        if head:
            head += events
            return head
        return events

    def _need(self, data: bytes | bytearray, pos: int, n: int) -> int | None:
        """The total length of the packet at ``pos`` if its header is complete, else None
        (checks the first byte and the remaining length on the way)."""
        try:
            why = _FIRST[data[pos]]
            if why is not None:
                raise ProtocolError(why)
            length, i = self._length(data, pos, n)
        except ProtocolError:
            self._failed = True
            self._buf.clear()
            raise
        return None if length < 0 else i + length - pos

    def _length(self, data: bytes | bytearray, pos: int, n: int) -> tuple[int, int]:
        """(remaining length, index after it), or (-1, 0) if not all of it is here."""
        i = pos + 1
        length = 0
        shift = 0
        while True:
            if i >= n:
                return -1, 0
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise ProtocolError(
                        f"{NAMES[data[pos] >> 4]}: remaining length not in its shortest form (MQTT-2.2.3)")
                break
            shift += 7
            if shift > 21:
                raise ProtocolError(
                    f"{NAMES[data[pos] >> 4]}: remaining length longer than 4 bytes (MQTT-2.2.3)")
        if length > self.max_packet_bytes:
            raise ProtocolError(
                f"{NAMES[data[pos] >> 4]}: remaining length {length} exceeds the limit of "
                f"{self.max_packet_bytes} bytes (max_packet_bytes)")
        return length, i

    def _parse(self, data: bytes, pos: int) -> tuple[list[Event], int]:
        """The events of the complete packets in ``data`` from ``pos`` on, and where the
        rest starts."""
        events: list[Event] = []
        append = events.append
        first_rules = _FIRST
        topics = self._topics
        limit = self.max_packet_bytes
        raw = self.raw
        fast = self._fast
        n = len(data)
        while pos < n:
            if fast is not None:
                pos = fast(data, pos, limit, topics, events)
                if pos == n:
                    break
            first = data[pos]
            if first & 0xF0 != 0x30 or first & 6 == 6:  # not a PUBLISH of QoS 0-2
                why = first_rules[first]
                if why is not None:
                    raise ProtocolError(why)
            # remaining length, inlined for the common one-byte case
            if pos + 1 >= n:
                break
            length = data[pos + 1]
            if length < 0x80:
                i = pos + 2
                if length > limit:
                    self._length(data, pos, n)  # raises with the packet's name
            else:
                length, i = self._length(data, pos, n)  # checks the limit
                if length < 0:
                    break
            end = i + length
            if end > n:
                break
            if first & 0xF0 == 0x30:
                qos = (first >> 1) & 3
                if length < 2:
                    raise ProtocolError(
                        f"PUBLISH: remaining length {length} leaves no room for the topic length (MQTT-3.3.2)")
                t_end = i + 2 + ((data[i] << 8) | data[i + 1])
                if t_end > end or (qos and t_end + 2 > end):
                    raise ProtocolError(
                        "PUBLISH: the topic (and packet id) run past the end of the packet (MQTT-3.3.2)")
                tb = data[i + 2 : t_end]
                topic = topics.get(tb)
                if topic is None:
                    topic = _received_topic(tb)
                    if len(tb) <= 256:  # bounded: at most 4096 short topics
                        if len(topics) >= 4096:
                            topics.clear()
                        topics[tb] = topic
                if qos:
                    pid = (data[t_end] << 8) | data[t_end + 1]
                    if not pid:
                        raise ProtocolError(f"PUBLISH: packet id 0 with QoS {qos} (MQTT-2.3.1-1)")
                    payload = data[t_end + 2 : end]
                else:
                    if first & 8:
                        raise ProtocolError("PUBLISH: DUP set on a QoS 0 message (MQTT-3.3.1-2)")
                    pid = 0
                    payload = data[t_end:end]
                if raw:
                    append((topic, payload, pid, first))  # type: ignore[arg-type]
                else:
                    append(Message(topic, payload, qos, first & 1 == 1, first & 8 == 8, pid))
                pos = end
                continue
            ptype = first >> 4
            self.controls += 1
            if ptype == PUBACK or ptype == UNSUBACK:
                if length != 2:
                    raise ProtocolError(f"{NAMES[ptype]}: remaining length {length}, must be 2 (MQTT-3.{ptype}.1)")
                pid = (data[i] << 8) | data[i + 1]
                if not pid:
                    raise ProtocolError(f"{NAMES[ptype]}: packet id 0 (MQTT-2.3.1-1)")
                append(PubAck(pid) if ptype == PUBACK else UnsubAck(pid))
            elif ptype == SUBACK:
                if length < 3:
                    raise ProtocolError(f"SUBACK: remaining length {length}, must be at least 3 (MQTT-3.9.3)")
                pid = (data[i] << 8) | data[i + 1]
                if not pid:
                    raise ProtocolError("SUBACK: packet id 0 (MQTT-2.3.1-1)")
                codes = list(data[i + 2 : end])
                for c in codes:
                    if c not in _SUBACK_CODES:
                        raise ProtocolError(f"SUBACK: return code {c:#x}, must be 0, 1, 2 or 0x80 (MQTT-3.9.3-2)")
                append(SubAck(pid, codes))
            elif ptype == PINGRESP:
                if length:
                    raise ProtocolError(f"PINGRESP: remaining length {length}, must be 0 (MQTT-3.13.1)")
                append(PINGRESP_EVENT)
            else:  # CONNACK: the first rules let no other type through
                if length != 2:
                    raise ProtocolError(f"CONNACK: remaining length {length}, must be 2 (MQTT-3.2.1)")
                flags, code = data[i], data[i + 1]
                if flags & 0xFE:
                    raise ProtocolError(f"CONNACK: reserved flag bits set ({flags:#x}) (MQTT-3.2.2-1)")
                if code > 5:
                    raise ProtocolError(f"CONNACK: unknown return code {code} (MQTT-3.2.2.3)")
                if code and flags:
                    raise ProtocolError("CONNACK: session present with a refusal (MQTT-3.2.2-4)")
                append(ConnAck(bool(flags), code))
            pos = end
        return events, pos


def _received_topic(tb: bytes) -> str:
    if not tb:
        raise ProtocolError("PUBLISH: empty topic name (MQTT-4.7.3-1)")
    try:
        topic = tb.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(
            f"PUBLISH: topic is not well-formed UTF-8 ({e.reason} at byte {e.start}) (MQTT-1.5.3-1)") from None
    if b"\x00" in tb:
        raise ProtocolError("PUBLISH: topic holds U+0000 (MQTT-1.5.3-2)")
    if b"+" in tb or b"#" in tb:
        raise ProtocolError(f"PUBLISH: topic {topic[:80]!r} holds a wildcard (MQTT-3.3.2-2)")
    return topic
