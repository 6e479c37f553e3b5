"""edge/_cparse.c, the C fast path of ``Decoder(raw=True)``, against the pure Python path.

The C function takes only ordinary QoS 0/1 PUBLISHes on topics the Python code has
already checked, and stops at the first packet that is anything else; so a raw decoder
with it must give exactly what the pure Python decoder gives (events, bytes buffered,
packets counted, the ProtocolError's text) for any bytes in any reads. And the function
alone takes exactly the packets its docstring names, leaking nothing. Skipped when the
extension is not built; tests/test_mqtt_codec.py and tests/test_mqtt_batch.py run the
pure path either way.
"""

from __future__ import annotations

import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge._codec import Decoder, Message, encode_event, varint
from edge.errors import ProtocolError

parse_publishes = pytest.importorskip(
    "edge._cparse", reason="the C accelerator is not built (no C compiler or Python headers at install)"
).parse_publishes

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHECKED = {b"a": "a", b"dt/x": "dt/x", "é".encode(): "é"}  # topics the Python code let through


def decode(data: bytes, chunks: list[int], *, fast: bool, limit: int = 1000,
           topics: dict[bytes, str] | None = None) -> tuple[list[object], list[tuple[int, int]], str | None]:
    """A raw decoder's events, (buffered, controls) after each read, and its ProtocolError."""
    d = Decoder(limit, raw=True)
    d._fast = parse_publishes if fast else None  # whatever EDGEFERRY_PURE_PYTHON says
    d._topics.update(topics or {})
    out: list[object] = []
    after: list[tuple[int, int]] = []
    pos = 0
    try:
        for c in [*chunks, len(data)]:
            out += d.feed(data[pos : pos + c])
            after.append((d.buffered, d.controls))
            pos += c
    except ProtocolError as e:
        return out, after, str(e)
    return out, after, None


def same(data: bytes, chunks: list[int], *, limit: int = 1000, topics: dict[bytes, str] | None = None) -> None:
    assert decode(data, chunks, fast=True, limit=limit, topics=topics) == \
        decode(data, chunks, fast=False, limit=limit, topics=topics)


def every_cut(data: bytes, **kw: object) -> None:
    """Whole, byte by byte, and split in two at every byte boundary."""
    same(data, [], **kw)  # type: ignore[arg-type]
    same(data, [1] * len(data), **kw)  # type: ignore[arg-type]
    for cut in range(1, len(data)):
        same(data, [cut], **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ any bytes


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=8),
       st.sampled_from([2, 5, 127, 128, 1000]), st.booleans())
@example(b"\x32\x05\x00\x01a\x00\x00", [], 1000, True)  # packet id 0
@example(b"\x38\x03\x00\x01a", [], 1000, True)  # DUP on QoS 0
@example(b"\x34\x05\x00\x01a\x00\x01", [], 1000, True)  # QoS 2
@example(b"\x30\x80\x01" + b"\x00\x01a" + bytes(125), [], 127, True)  # one byte over the limit
@example(b"\x30\x85\x00\x00\x01axy", [], 1000, True)  # remaining length not in its shortest form
@example(b"\x32\x03\x00\x01a\x30\x03\x00\x01a", [], 1000, True)  # QoS 1 with no room for the packet id
def test_any_bytes_decode_as_in_pure_python(data, chunks, limit, cached):
    same(data, chunks, limit=limit, topics=CHECKED if cached else None)


publishes = st.builds(
    lambda t, p, q, retain, dup, pid: Message(t, p, q, retain, dup and q > 0, pid if q else 0),
    st.sampled_from(["a", "dt/x", "é", "b/new", "x" * 300]), st.binary(max_size=20), st.sampled_from([0, 1, 1, 2]),
    st.booleans(), st.booleans(), st.integers(1, 65535))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(publishes, min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3), st.booleans())
def test_publish_streams_decode_as_in_pure_python_split_anywhere(msgs, changes, cached):
    """Valid PUBLISH streams (topics cached or not, one too long to cache, QoS 2, DUP),
    with a few bytes set (pid 0, DUP on QoS 0, flags, lengths), split at every boundary."""
    stream = bytearray(b"".join(encode_event(m) for m in msgs))
    for at, byte in changes:
        stream[at % len(stream)] = byte
    every_cut(bytes(stream), topics=CHECKED if cached else None)


@pytest.mark.parametrize("remaining", [127, 128, 16383, 16384])
@pytest.mark.parametrize("qos", [0, 1])
def test_remaining_length_edges_and_the_limit(remaining, qos):
    """A PUBLISH of each remaining length at a varint width edge, after and before a
    small one, at the limit and one byte over it, cut at every boundary of its header."""
    body = remaining - 3 - 2 * qos  # topic "a" (2 + 1 bytes), packet id
    big = encode_event(Message("a", b"p" * body, qos, False, False, 7 if qos else 0))
    assert big[1 : 1 + len(varint(remaining))] == varint(remaining)
    small = encode_event(Message("a", b"x", 1, False, False, 1))
    stream = small + big + encode_event(Message("a", b"", 0, True, False, 0))
    for limit in (remaining, remaining - 1):
        for topics in (CHECKED, None):
            same(stream, [], limit=limit, topics=topics)
            for cut in range(1, 12):
                same(stream, [cut], limit=limit, topics=topics)
                same(stream, [8 + cut], limit=limit, topics=topics)
            same(stream, [8, len(big) - 1], limit=limit, topics=topics)


def test_a_full_topic_cache_is_emptied_and_refilled_as_in_pure_python():
    msgs = [Message(f"dt/{i}", b"v", 1, False, False, i % 65535 + 1) for i in range(5000)]
    stream = b"".join(encode_event(m) for m in msgs * 2)
    fast, after, why = decode(stream, [997] * (len(stream) // 997), fast=True, limit=1 << 20)
    assert (fast, after, why) == decode(stream, [997] * (len(stream) // 997), fast=False, limit=1 << 20)
    assert why is None and len(fast) == 10_000


def test_controls_between_publishes_are_counted_as_in_pure_python():
    pub = encode_event(Message("a", b"x", 1, False, False, 1))
    stream = pub + b"\xd0\x00" + pub * 3 + b"\x40\x02\x00\x05" + pub + b"\x90\x03\x00\x01\x00"
    every_cut(stream, topics=CHECKED)
    _, after, _ = decode(stream, [], fast=True, topics=CHECKED)
    assert after == [(0, 3)]


# ------------------------------------------------------------------ the function alone


def model(data: bytes, pos: int, limit: int, topics: dict[bytes, str]) -> tuple[list[object], int]:
    """What parse_publishes takes, as its docstring says, in Python."""
    out: list[object] = []
    while pos < len(data):
        first = data[pos]
        qos = (first >> 1) & 3
        if first >> 4 != 3 or qos > 1 or (qos == 0 and first & 8):
            break
        length, i, shift = 0, pos + 1, 0
        while i < len(data) and shift <= 21:
            length |= (data[i] & 0x7F) << shift
            i += 1
            if data[i - 1] < 0x80:
                break
            shift += 7
        else:
            break  # incomplete, or longer than 4 bytes
        if (data[i - 1] == 0 and shift) or length > limit or i + length > len(data) or length < 2:
            break
        end = i + length
        t_end = i + 2 + int.from_bytes(data[i : i + 2], "big")
        pid = int.from_bytes(data[t_end : t_end + 2], "big") if qos else 0
        if t_end + 2 * qos > end or (qos and not pid) or data[i + 2 : t_end] not in topics:
            break
        out.append((topics[data[i + 2 : t_end]], data[t_end + 2 * qos : end], pid, first))
        pos = end
    return out, pos


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 20), st.sampled_from([0, 3, 127, 128, 1000]))
@example(b"\x30\x03\x00\x01a" * 3, 0, 1000)
@example(b"\x32\x05\x00\x01a\x00\x09\x33\xff\xff\xff\x7f", 0, 1000)
@example(b"\x30\x85\x00\x00\x01axy", 0, 1000)
@example(b"\x32\x03\x00\x01a\x30\x03\x00\x01a", 0, 1000)
def test_the_function_takes_exactly_what_its_docstring_says(data, pos, limit):
    events: list[object] = [None]
    got = parse_publishes(data, pos, limit, CHECKED, events)
    want, want_pos = model(data, pos, limit, CHECKED)
    assert (events[1:], got) == (want, want_pos)


def test_the_function_takes_a_common_stream_whole():
    stream = b"".join(encode_event(Message(t, bytes(range(100)), q, r, d, 9 if q else 0))
                      for t in ("a", "dt/x", "é") for q in (0, 1) for r in (False, True) for d in (False, True)
                      if q or not d)
    events: list[object] = []
    assert parse_publishes(stream, 0, 1000, CHECKED, events) == len(stream)
    assert len(events) == 18 and events[-1] == ("é", bytes(range(100)), 9, 0x3B)


def test_the_function_refuses_other_argument_types():
    for args in ((bytearray(b"\x30"), 0, 9, {}, []), (b"\x30", 0, 9, [], []), (b"\x30", 0, 9, {}, ()),
                 (b"\x30", 0, 9, {}), (b"\x30", "0", 9, {}, [])):
        with pytest.raises(TypeError):
            parse_publishes(*args)


def test_the_function_leaks_nothing():
    """Many calls that take packets, stop at a topic not cached, and stop at a bad one:
    the topic's reference count and the traced memory come back to where they were."""
    topic = CHECKED[b"dt/x"]
    good = b"".join(encode_event(Message("dt/x", b"v" * 50, 1, False, False, 1 + i)) for i in range(50))
    new_topic = good + encode_event(Message("new", b"", 0, False, False, 0))
    incomplete = good + encode_event(Message("dt/x", b"v", 1, False, False, 3))[:-1]
    refs = sys.getrefcount(topic)

    def calls() -> None:
        for _ in range(200):
            events: list[object] = []
            assert parse_publishes(good, 0, 1000, CHECKED, events) == len(good)
            assert parse_publishes(new_topic, 0, 1000, CHECKED, events) == len(good)
            assert parse_publishes(incomplete, 0, 1000, CHECKED, events) == len(good)
            assert len(events) == 150
            with pytest.raises(TypeError):
                parse_publishes(good, 0, 1000, CHECKED, ())
            del events

    calls()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sys.getrefcount(topic) == refs
    assert grown < 10_000, f"{grown} bytes more after 200 rounds"
