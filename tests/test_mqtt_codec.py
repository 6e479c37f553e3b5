"""edge/_codec.py: the MQTT 3.1.1 codec on its own, no sockets.

Fuzzed with hypothesis (bounded: the file runs in a few seconds): arbitrary bytes raise
nothing but ProtocolError and yield only packets the bytes hold; a valid stream split at
every byte boundary decodes as the whole does; every packet type round-trips, also at
the remaining-length edges. Every decode here runs on each parse path (``decode_all``):
the ordinary decoder, the raw one in pure Python, and the raw one with the C fast path
(edge/_cparse.c) when it is built; tests/test_cparse.py compares the last two directly.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge._codec import (
    PINGRESP_EVENT,
    ConnAck,
    Decoder,
    Message,
    PubAck,
    SubAck,
    UnsubAck,
    check_filter,
    encode_connect,
    encode_event,
    encode_pubacks,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    raw_message,
    varint,
)
from edge.errors import ConfigError, ProtocolError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_tuple(ev: object) -> tuple[object, ...]:
    if isinstance(ev, Message):
        return ("msg", ev.topic, ev.payload, ev.qos, ev.retain, ev.dup, ev.pid)
    return (repr(ev),)


try:
    from edge._cparse import parse_publishes
except ImportError:  # not built: the pure Python paths only
    PATHS = {"ordinary": (False, None), "raw": (True, None)}
else:
    PATHS = {"ordinary": (False, None), "raw": (True, None), "raw, C fast path": (True, parse_publishes)}


def decode_all(data: bytes, *, chunks: list[int] | None = None, limit: int = 1 << 24) -> list[object]:
    """The ordinary decoder's events of ``data``, fed whole or in ``chunks``, or its
    ProtocolError; checked to be exactly what every other parse path gives."""
    runs = {name: _decode_on(raw, fast, data, chunks, limit) for name, (raw, fast) in PATHS.items()}
    out, error = runs["ordinary"]
    for name, (other, other_error) in runs.items():
        assert ([as_tuple(e) for e in other], str(other_error)) == ([as_tuple(e) for e in out], str(error)), name
    if error is not None:
        raise error
    return out


def _decode_on(raw: bool, fast: object, data: bytes, chunks: list[int] | None,
               limit: int) -> tuple[list[object], ProtocolError | None]:
    d = Decoder(limit, raw=raw)
    d._fast = fast  # type: ignore[assignment]
    out: list[object] = []
    pos = 0
    try:
        for c in chunks or ():
            out += d.feed(data[pos : pos + c])
            pos += c
        out += d.feed(data[pos:])
        error = None
    except ProtocolError as e:
        error = e
    return [raw_message(ev) if type(ev) is tuple else ev for ev in out], error  # type: ignore[arg-type]


# ------------------------------------------------------------------ strategies

topics = st.text(
    st.characters(exclude_characters="+#\x00", exclude_categories=("Cs",)), min_size=1, max_size=20)
pids = st.integers(1, 65535)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    qos = draw(st.sampled_from([0, 1, 2]))
    return Message(draw(topics), draw(st.binary(max_size=300)), qos, draw(st.booleans()),
                   draw(st.booleans()) if qos else False, draw(pids) if qos else 0)


@st.composite
def small_messages(draw: st.DrawFn) -> Message:
    qos = draw(st.sampled_from([0, 1]))
    return Message(draw(st.sampled_from(["a", "dt/x", "é"])), draw(st.binary(max_size=4)), qos,
                   draw(st.booleans()), draw(st.booleans()) if qos else False, draw(pids) if qos else 0)


events = st.one_of(
    messages(),
    st.builds(ConnAck, st.booleans(), st.just(0)),
    st.builds(ConnAck, st.just(False), st.integers(1, 5)),
    st.builds(PubAck, pids),
    st.builds(UnsubAck, pids),
    st.builds(SubAck, pids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5)),
    st.just(PINGRESP_EVENT),
)


# ------------------------------------------------------------------ fuzzing


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
@example(b"\x40\x00\x30\x07\x00\x03a/b\x00\x01", [])  # PUBACK of length 0, then a PUBLISH
@example(b"\x20\x00\xd0\x00", [])  # zero-length CONNACK, then PINGRESP
@example(b"\x30\xff\xff\xff\x7f", [])  # 268,435,455 bytes declared
@example(b"\x40\x03\x00\x01\x00", [])  # PUBACK one byte too long
@example(b"\x30\x04\x00\x09ab\x40\x02\x00\x01", [])  # topic length past the packet end
def test_arbitrary_bytes_raise_only_protocol_error_and_yield_only_what_they_hold(data, chunks):
    """Whatever comes in, the decoder either returns events or raises ProtocolError; and
    the events it returns, encoded again, are exactly the bytes they came from (nothing
    invented from the next packet's bytes, nothing completed that was not there)."""
    check_yields_only_what_is_there(data, chunks)


def check_yields_only_what_is_there(data: bytes, chunks: list[int]) -> None:
    """Decoded whole and in ``chunks``: ProtocolError, or events that encode back to a
    prefix of ``data`` whose rest is the start of one packet, not whole packets unread."""
    for split in (None, chunks):
        try:
            got = decode_all(data, chunks=split, limit=1000)
        except ProtocolError:
            continue
        again = b"".join(encode_event(e) for e in got)  # type: ignore[arg-type]
        assert data.startswith(again)
        assert decode_all(data[len(again):], limit=1000) == []


small_events = st.one_of(
    small_messages(),
    st.builds(ConnAck, st.booleans(), st.just(0)),
    st.builds(PubAck, pids),
    st.builds(UnsubAck, pids),
    st.builds(SubAck, pids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=3)),
    st.just(PINGRESP_EVENT),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(small_events, min_size=1, max_size=4), st.data())
def test_mutated_valid_streams_raise_only_protocol_error_and_yield_only_what_they_hold(evs, data):
    """Random bytes mostly die at the first byte; valid streams with a few bytes changed,
    inserted or cut reach every rule."""
    stream = bytearray(b"".join(encode_event(e) for e in evs))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(stream)))
        how = data.draw(st.sampled_from(["set", "nudge", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if how == "set" and at < len(stream):
            stream[at] = byte
        elif how == "nudge" and at < len(stream):  # a length or flag off by a little
            stream[at] = (stream[at] + data.draw(st.sampled_from([-2, -1, 1, 2, 8]))) % 256
        elif how == "insert":
            stream.insert(at, byte)
        elif at < len(stream):
            del stream[at]
    check_yields_only_what_is_there(bytes(stream), data.draw(st.lists(st.integers(1, 50), max_size=6)))


@FUZZ
@given(st.lists(events, min_size=1, max_size=8), st.data())
def test_a_valid_stream_decodes_the_same_split_anywhere(evs, data):
    stream = b"".join(encode_event(e) for e in evs)
    whole = [as_tuple(e) for e in decode_all(stream)]
    assert whole == [as_tuple(e) for e in evs]
    cut = data.draw(st.integers(0, len(stream)))
    d = Decoder()
    parts = d.feed(stream[:cut]) + d.feed(stream[cut:])
    assert [as_tuple(e) for e in parts] == whole
    assert d.buffered == 0
    assert [as_tuple(e) for e in decode_all(stream, chunks=[cut])] == whole  # on every path


def test_every_byte_boundary_and_byte_by_byte():
    evs = [ConnAck(True, 0), Message("dt/a/temp", b"x" * 300, 1, False, False, 7), PubAck(9),
           SubAck(3, [0, 1, 0x80]), UnsubAck(4), PINGRESP_EVENT, Message("é/ü", b"", 0, True, False, 0)]
    stream = b"".join(encode_event(e) for e in evs)
    want = [as_tuple(e) for e in evs]
    for cut in range(len(stream) + 1):
        assert [as_tuple(e) for e in decode_all(stream, chunks=[cut])] == want
    assert [as_tuple(e) for e in decode_all(stream, chunks=[1] * len(stream))] == want


@FUZZ
@given(messages())
def test_publish_round_trip(m):
    if m.qos == 2:
        with pytest.raises(ConfigError, match="QoS 2"):
            encode_publish(m.topic, m.payload, 2, m.retain, m.pid)
        return
    wire = encode_publish(m.topic, m.payload, m.qos, m.retain, m.pid, m.dup)
    assert wire == encode_event(m)
    [got] = decode_all(wire)
    assert as_tuple(got) == as_tuple(m)


@pytest.mark.parametrize("remaining", [0, 127, 128, 16383, 16384, 2097151, 2097152])
def test_remaining_length_edges(remaining):
    """Every encoding width of the remaining length, at both ends: a SUBACK for the short
    ones (it needs 3 bytes), a PUBLISH for the rest, fed whole and in 64 KiB reads."""
    assert len(varint(remaining)) == 1 + (remaining >= 128) + (remaining >= 16384) + (remaining >= 2097152)
    if remaining == 0:
        wire = encode_event(PINGRESP_EVENT)
    else:
        body = remaining - 2 - 1  # topic "t"
        wire = encode_publish("t", b"p" * body, 0, False, 0) if body >= 0 else b""
    if remaining and remaining < 3:
        return
    assert wire[1 : 1 + len(varint(remaining))] == varint(remaining)
    [whole] = decode_all(wire)
    chunked = decode_all(wire, chunks=[65536] * (len(wire) // 65536))
    assert [as_tuple(e) for e in chunked] == [as_tuple(whole)]
    if remaining:
        assert isinstance(whole, Message) and len(whole.payload) == remaining - 3


def test_control_packets_round_trip():
    for ev in (ConnAck(False, 0), ConnAck(True, 0), ConnAck(False, 5), PubAck(1), PubAck(65535),
               UnsubAck(77), SubAck(2, [0, 1, 2, 0x80]), PINGRESP_EVENT):
        assert [as_tuple(e) for e in decode_all(encode_event(ev))] == [as_tuple(ev)]


def test_outgoing_packets_are_exact():
    assert encode_connect("c", clean_session=True, keepalive=60) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c")
    c = encode_connect("id", clean_session=False, keepalive=5, will=("state/x", b"off", 1, True),
                       username="u", password="p")
    assert c[9] == 0x80 | 0x40 | 0x20 | 0x08 | 0x04 and c.endswith(b"\x00\x01u\x00\x01p")
    assert encode_subscribe(5, [("a/+/c", 1), ("#", 0)]) == b"\x82\x0e\x00\x05\x00\x05a/+/c\x01\x00\x01#\x00"
    assert encode_unsubscribe(6, ["a/#"]) == b"\xa2\x07\x00\x06\x00\x03a/#"
    assert encode_pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


# ------------------------------------------------------------------ each rule, by name

BAD = {
    "PUBACK remaining length 0": (b"\x40\x00\x30\x07\x00\x03a/b\x00\x01", "PUBACK: remaining length 0"),
    "PUBACK one byte too long": (b"\x40\x03\x00\x01\x00", "PUBACK: remaining length 3"),
    "zero-length CONNACK": (b"\x20\x00\xd0\x00", "CONNACK: remaining length 0"),
    "CONNACK reserved flags": (b"\x20\x02\x02\x00", "reserved flag"),
    "CONNACK unknown code": (b"\x20\x02\x00\x06", "unknown return code"),
    "CONNACK present with refusal": (b"\x20\x02\x01\x05", "session present with a refusal"),
    "UNSUBACK too short": (b"\xb0\x01\x00", "UNSUBACK: remaining length 1"),
    "PINGRESP with a body": (b"\xd0\x01\x00", "PINGRESP: remaining length 1"),
    "SUBACK too short": (b"\x90\x02\x00\x01", "SUBACK: remaining length 2"),
    "SUBACK bad code": (b"\x90\x03\x00\x01\x03", "return code 0x3"),
    "SUBACK pid 0": (b"\x90\x03\x00\x00\x00", "packet id 0"),
    "PUBACK pid 0": (b"\x40\x02\x00\x00", "packet id 0"),
    "topic past the packet end": (b"\x30\x04\x00\x09ab\x40\x02\x00\x01", "run past the end"),
    "QoS 3": (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    "empty topic": (b"\x30\x02\x00\x00", "empty topic"),
    "wildcard topic +": (b"\x30\x05\x00\x03a/+", "wildcard"),
    "wildcard topic #": (b"\x30\x03\x00\x01#", "wildcard"),
    "pid 0": (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
    "DUP on QoS 0": (b"\x38\x03\x00\x01a", "DUP"),
    "topic not UTF-8": (b"\x30\x04\x00\x02\xc3\x28", "UTF-8"),
    "topic with an encoded surrogate": (b"\x30\x05\x00\x03\xed\xa0\x80", "UTF-8"),
    "topic with U+0000": (b"\x30\x04\x00\x02a\x00", "U\\+0000"),
    "PUBACK flags": (b"\x41\x02\x00\x01", "flags"),
    "CONNECT from a server": (b"\x10", "never sends"),
    "SUBSCRIBE from a server": (b"\x82", "never sends"),
    "PINGREQ from a server": (b"\xc0", "never sends"),
    "DISCONNECT from a server": (b"\xe0", "never sends"),
    "PUBREC (QoS 2 flow)": (b"\x50\x02\x00\x01", "QoS 2"),
    "reserved type 0": (b"\x00", "reserved"),
    "reserved type 15": (b"\xf0", "reserved"),
    "remaining length of 5 bytes": (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    "remaining length not shortest": (b"\xd0\x80\x00", "shortest form"),
    "PUBLISH remaining length not shortest": (b"\x30\x85\x00\x00\x01axy", "shortest form"),
    "268,435,455 bytes declared": (b"\x30\xff\xff\xff\x7f", "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_rule_is_a_protocol_error_naming_packet_and_rule(case):
    data, match = BAD[case]
    with pytest.raises(ProtocolError, match=match):
        decode_all(data)
    # the same, byte by byte: refused at the byte that breaks the rule, nothing yielded
    d = Decoder()
    with pytest.raises(ProtocolError, match=match):
        for i in range(len(data)):
            assert d.feed(data[i : i + 1]) == []
    with pytest.raises(ProtocolError):
        d.feed(b"\xd0\x00")  # a failed decoder stays failed


def test_oversize_is_refused_before_buffering():
    """max_packet_bytes is checked at the remaining length, before the body arrives."""
    d = Decoder(1024)
    with pytest.raises(ProtocolError, match="remaining length 1025 exceeds the limit of 1024"):
        d.feed(b"\x30" + varint(1025))
    d = Decoder(1024)
    assert d.feed(b"\x30" + varint(1024) + b"\x00\x01t") == []
    assert d.buffered == 6


def test_large_packet_in_small_reads_is_not_recopied():
    """A 16 MiB PUBLISH in 64 KiB reads: the buffer grows by appending (and time stays
    linear: each read costs its own size, not the buffer's)."""
    payload = bytes(range(256)) * (16 * 4096 - 1)
    wire = encode_publish("big/x", payload, 1, False, 9)
    d = Decoder()
    got: list[object] = []
    for i in range(0, len(wire), 65536):
        got += d.feed(wire[i : i + 65536])
        assert d.buffered == (0 if got else i + len(wire[i : i + 65536]))
    [m] = got
    assert isinstance(m, Message) and m.payload == payload and m.pid == 9


# ------------------------------------------------------------------ encoders refuse


@pytest.mark.parametrize("call, match", [
    (lambda: encode_publish("a" * 65536, b"", 0, False, 0), "65535"),
    (lambda: encode_publish("", b"", 0, False, 0), "empty"),
    (lambda: encode_publish("a/+", b"", 0, False, 0), "wildcard"),
    (lambda: encode_publish("a/#", b"", 0, False, 0), "wildcard"),
    (lambda: encode_publish("a\x00", b"", 0, False, 0), "U\\+0000"),
    (lambda: encode_publish("a\ud800", b"", 0, False, 0), "surrogate"),
    (lambda: encode_publish("a", b"", 2, False, 1), "QoS 2 is not supported"),
    (lambda: encode_publish("a", b"", 3, False, 1), "QoS must be 0 or 1"),
    (lambda: encode_publish("a", b"", 1, False, 0), "packet id"),
    (lambda: encode_publish("a", b"", 1, False, 65536), "packet id"),
    (lambda: encode_publish("a", b"", 0, False, 0, dup=True), "DUP"),
    (lambda: encode_connect("c" * 65536, clean_session=True, keepalive=1), "client id"),
    (lambda: encode_connect("", clean_session=False, keepalive=1), "clean session"),
    (lambda: encode_connect("c", clean_session=True, keepalive=65536), "keepalive"),
    (lambda: encode_connect("c", clean_session=True, keepalive=-1), "keepalive"),
    (lambda: encode_connect("c", clean_session=True, keepalive=1, will=("w", b"x" * 65536, 1, True)),
     "will payload"),
    (lambda: encode_connect("c", clean_session=True, keepalive=1, will=("w" * 65536, b"", 1, True)), "topic"),
    (lambda: encode_connect("c", clean_session=True, keepalive=1, will=("w", b"", 2, True)), "QoS 2"),
    (lambda: encode_connect("c", clean_session=True, keepalive=1, password="p"), "user name"),
    (lambda: encode_subscribe(1, [("a/#/b", 1)]), "'#'"),
    (lambda: encode_subscribe(1, [("a/b+", 1)]), "'\\+'"),
    (lambda: encode_subscribe(1, [("a", 2)]), "QoS 2"),
    (lambda: encode_subscribe(1, []), "at least one"),
    (lambda: encode_subscribe(0, [("a", 1)]), "packet id"),
    (lambda: encode_unsubscribe(1, [""]), "empty"),
])
def test_encoders_refuse_with_a_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_filters():
    for ok in ("#", "+", "a/+/c", "a/#", "+/+", "/", "a//b"):
        check_filter(ok)
