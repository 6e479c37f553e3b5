"""The batch receive path (issue 15): ``Decoder(raw=True)`` checks exactly what the
ordinary decoder checks; ``MQTTClient(on_batch=...)`` keeps arrival order, PUBACK order
and every refusal of the per-message path; ``read_hold`` rests the socket only while
messages stream in. The fake broker is tests/test_mqtt_client.py's.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge import mqtt
from edge._codec import Decoder, Message, encode_event, raw_message
from edge.errors import ConfigError, ProtocolError
from edge.mqtt import MQTTClient
from tests.test_mqtt_client import FakeBroker, closed_within, publish, until
from tests.test_mqtt_codec import BAD, as_tuple, small_events

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fake():
    async with FakeBroker() as fb:
        yield fb


# ------------------------------------------------------------------ the codec


def _decode(data: bytes, chunks: list[int], raw: bool, pure: bool = False) -> tuple[list[object], str | None]:
    """Events (PUBLISHes as tuples of their fields), fed in pieces of the given sizes,
    and the ProtocolError's text, if any; ``pure``: the raw decoder without its C fast
    path (which it has when edge/_cparse.c is built, unless EDGEFERRY_PURE_PYTHON=1)."""
    d = Decoder(1000, raw=raw)
    if pure:
        d._fast = None
    out: list[object] = []
    why = None
    pos = 0
    try:
        for c in chunks:
            out += d.feed(data[pos : pos + c])
            pos += c
        out += d.feed(data[pos:])
    except ProtocolError as e:
        why = str(e)
    return [as_tuple(raw_message(e) if type(e) is tuple else e) for e in out], why  # type: ignore[arg-type]


def _same(data: bytes, chunks: list[int]) -> None:
    ordinary = _decode(data, chunks, False)
    assert _decode(data, chunks, True) == ordinary
    assert _decode(data, chunks, True, pure=True) == ordinary


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
@example(b"\x32\x05\x00\x01a\x00\x00", [])  # packet id 0
@example(b"\x3c\x05\x00\x01a\x00\x01", [])  # QoS 2 with DUP: the decoder passes it, the client refuses
def test_raw_decoding_yields_and_refuses_exactly_what_the_ordinary_one_does(data, chunks):
    _same(data, chunks)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(small_events, min_size=1, max_size=6), st.data())
def test_raw_decoding_of_mutated_valid_streams_matches(evs, data):
    stream = bytearray(b"".join(encode_event(e) for e in evs))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, max(0, len(stream) - 1)))
        if stream:
            stream[at] = (stream[at] + data.draw(st.sampled_from([-2, -1, 1, 2, 8, 128]))) % 256
    _same(bytes(stream), data.draw(st.lists(st.integers(1, 50), max_size=6)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["dt/a", "dt/b/temp", "é"]), st.binary(max_size=130),
                          st.integers(0, 3)), min_size=2, max_size=8), st.data())
def test_raw_decoding_of_mutated_qos1_streams_matches(msgs, data):
    """The raw path's shortcut (a QoS 1 PUBLISH under 128 bytes on a topic seen before):
    streams of those, a few bytes changed, in any reads, decode and fail as the
    ordinary decoder's do."""
    stream = bytearray(b"".join(encode_event(Message(t, p, 1, False, False, pid)) for t, p, pid in msgs))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = (stream[at] + data.draw(st.sampled_from([-2, -1, 1, 2, 8, 128, 0x80]))) % 256
    _same(bytes(stream), data.draw(st.lists(st.integers(1, 80), max_size=6)))


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), st.sampled_from(["dt/a", "dt/b", "dt/ü", "x" * 200]),
       st.lists(st.integers(0, 9), min_size=2, max_size=12), st.data())
def test_raw_decoding_of_mutated_runs_of_one_shape_matches(plen, topic, pids, data):
    """The raw path reads a run of QoS 1 PUBLISHes of one size and topic length column by
    column: such runs (empty payloads too, pid 0, same-length topics never seen), a few
    bytes changed, in any reads, decode and fail as the ordinary decoder's do."""
    alt = topic[:-1] + "z"  # the same length, another topic
    msgs = [Message(alt if p == 9 else topic, bytes([p]) * plen, 1, False, False, p) if p else
            Message(topic, bytes(plen), 1, False, False, 1) for p in pids]
    stream = bytearray(b"".join(encode_event(m) for m in msgs))
    for i, p in enumerate(pids):
        if p == 0:  # packet id 0, kept the same size
            at = len(encode_event(msgs[0])) * i + 4 + len(topic.encode())
            stream[at:at + 2] = b"\x00\x00"
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = (stream[at] + data.draw(st.sampled_from([-1, 1, 2, 8, 0x80]))) % 256
    _same(bytes(stream), data.draw(st.lists(st.integers(1, 300), max_size=4)))


@pytest.mark.parametrize("case", list(BAD))
def test_each_rule_holds_in_raw_mode(case):
    data, match = BAD[case]
    fast, pure = Decoder(raw=True), Decoder(raw=True)
    pure._fast = None
    for d in (fast, pure):
        d._topics.update({b"a": "a", b"a/b": "a/b"})  # as if seen before: the C fast path's case
        with pytest.raises(ProtocolError, match=match):
            d.feed(data)


def test_a_raw_publish_carries_every_field():
    m = Message("dt/é", b"\x00x", 1, True, True, 65535)
    (got,) = Decoder(raw=True).feed(encode_event(m))
    assert got == ("dt/é", b"\x00x", 65535, 0x3B)
    assert as_tuple(raw_message(got)) == as_tuple(m)


# ------------------------------------------------------------------ the client


def test_on_message_and_on_batch_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        MQTTClient("mqtt://127.0.0.1:1", "x", on_message=print, on_batch=print)
    for bad in (-0.1, 2, "0.1"):
        with pytest.raises(ConfigError, match="read_hold"):
            MQTTClient("mqtt://127.0.0.1:1", "x", read_hold=bad)  # type: ignore[arg-type]


async def test_batches_keep_arrival_order_and_pubacks_follow_it(fake):
    batches: list[list[tuple[str, bytes, int, int]]] = []
    client, conn = await fake.session(on_batch=batches.append)
    conn.send(b"".join(publish(b"a", bytes([p]), qos=1, pid=p) for p in (10, 11, 12, 13)))
    await until(lambda: sum(map(len, batches)) == 4)
    assert [p[2] for b in batches for p in b] == [10, 11, 12, 13]
    assert [p[1] for b in batches for p in b] == [b"\x0a", b"\x0b", b"\x0c", b"\x0d"]
    client.ack(12)
    client.ack_many([13, 11])
    client.ack(10)
    pids = [int.from_bytes(await conn.expect(0x40), "big") for _ in range(4)]
    assert pids == [10, 11, 12, 13]


@pytest.mark.parametrize("bad, rule", [
    (b"\x30\x04\x00\x09ab" + publish(b"c/d", b"next packet"), "run past the end"),
    (publish(b"a/+/c"), "wildcard"),
    (publish(b"a/b", b"x", qos=1, pid=0), "packet id 0"),
    (publish(b"a/b", b"x", qos=2, pid=3), "QoS 2"),
    (publish(b"a/\xff"), "UTF-8"),
], ids=["topic-past-end", "plus", "pid0", "qos2", "utf8"])
async def test_a_malformed_publish_is_not_delivered_and_closes(fake, caplog, bad, rule):
    got: list[object] = []
    client, conn = await fake.session(on_batch=got.extend)
    conn.send(bad)
    why = await closed_within(client, 5)
    assert got == []
    assert rule in why and "PUBLISH" in why
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and rule in errors[0], errors


@pytest.mark.parametrize("bad, rule", [
    (publish(b"a", qos=1, pid=2), "still in use"),
    (publish(b"a", qos=2, pid=9), "QoS 2"),
])
async def test_in_one_read_what_precedes_a_violation_is_delivered_and_nothing_after(fake, bad, rule):
    got: list[tuple[str, bytes, int, int]] = []
    client, conn = await fake.session(on_batch=got.extend)
    conn.send(publish(b"a", qos=1, pid=1) + publish(b"a", qos=1, pid=2) + bad
              + publish(b"a", qos=1, pid=3))
    assert rule in await closed_within(client, 5)
    assert [p[2] for p in got] == [1, 2]


async def test_a_dup_redelivery_is_delivered_again_and_acked_once(fake):
    got: list[tuple[str, bytes, int, int]] = []
    client, conn = await fake.session(on_batch=got.extend)
    conn.send(publish(b"a", b"1", qos=1, pid=5) + publish(b"a", b"1", qos=1, pid=5, dup=True))
    await until(lambda: len(got) == 2)
    assert [p[3] & 8 for p in got] == [0, 8]
    client.ack_many([5])
    client.ack(5)
    assert int.from_bytes(await conn.expect(0x40), "big") == 5
    client.ping()
    await conn.expect(0xC0)  # no second PUBACK before the ping


async def test_a_packet_between_publishes_is_handled_in_its_place(fake):
    """PUBLISHes, a PINGRESP, a PUBLISH in one read: the first batch is delivered before
    the ping completes, the second after (the intake ends its redelivery phase so)."""
    seen: list[tuple[list[int], bool]] = []
    client, conn = await fake.session()
    ping = client.ping()
    await conn.expect(0xC0)
    client.on_batch = lambda b: seen.append(([p[2] for p in b], ping.done()))
    client._handler = client._handle_batch
    client._decoder.raw = True
    conn.send(publish(b"a", qos=1, pid=1) + publish(b"a", qos=1, pid=2) + b"\xd0\x00"
              + publish(b"a", qos=1, pid=3))
    await until(lambda: sum(len(p) for p, _ in seen) == 3)
    assert seen == [([1, 2], False), ([3], True)]


async def test_paused_batches_are_held_in_order_and_delivered_on_resume(fake):
    """The receiver pauses in its first batch; the rest of that read (a PINGRESP, two
    more PUBLISHes) is handled or held, and delivered in order on resume."""
    got: list[int] = []
    client: MQTTClient | None = None

    def on_batch(b: list[tuple[str, bytes, int, int]]) -> None:
        got.extend(p[2] for p in b)
        assert client is not None
        client.pause_reading()

    client, conn = await fake.session(on_batch=on_batch)
    ping = client.ping()
    await conn.expect(0xC0)
    conn.send(publish(b"a", qos=1, pid=1) + publish(b"a", qos=1, pid=2) + b"\xd0\x00"
              + publish(b"a", qos=1, pid=3) + publish(b"a", qos=1, pid=4))
    await asyncio.wait_for(ping, 5)
    assert got == [1, 2] and client._transport_paused
    client.resume_reading()
    await until(lambda: got == [1, 2, 3, 4])
    client.ack_many([1, 2, 3, 4])
    assert [int.from_bytes(await conn.expect(0x40), "big") for _ in range(4)] == [1, 2, 3, 4]


async def test_on_batch_raising_closes_the_connection(fake, caplog):
    def boom(b: object) -> None:
        raise ValueError("receiver broke")

    client, conn = await fake.session(on_batch=boom)
    conn.send(publish(b"a", qos=1, pid=1))
    assert "closed" in await closed_within(client, 5) or not client.connected
    assert any("on_batch raised" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ read_hold


async def test_a_lone_message_is_read_at_once_and_a_stream_rests_between_reads(fake):
    """read_hold 0.5 s: the first message after a quiet spell is delivered without a
    rest starting; a second read right behind it starts one; what arrives meanwhile is
    delivered when the rest ends, in order; nothing is lost."""
    got: list[int] = []
    client, conn = await fake.session(on_batch=lambda b: got.extend(p[2] for p in b), read_hold=0.5)
    conn.send(publish(b"a", qos=1, pid=1))
    await until(lambda: got == [1])
    assert client._hold_timer is None, "a lone message started a rest"
    conn.send(publish(b"a", qos=1, pid=2))
    await until(lambda: got == [1, 2])
    assert client._hold_timer is not None, "a second read right behind the first did not rest"
    conn.send(publish(b"a", qos=1, pid=3) + publish(b"a", qos=1, pid=4))
    await until(lambda: got == [1, 2, 3, 4], within=10)
    client.ack_many([1, 2, 3, 4])
    assert [int.from_bytes(await conn.expect(0x40), "big") for _ in range(4)] == [1, 2, 3, 4]


async def test_the_end_of_a_rest_does_not_undo_a_receiver_pause(fake):
    got: list[int] = []
    client, conn = await fake.session(on_batch=lambda b: got.extend(p[2] for p in b), read_hold=0.05)
    conn.send(publish(b"a", qos=1, pid=1))
    await until(lambda: got == [1])
    conn.send(publish(b"a", qos=1, pid=2))
    await until(lambda: got == [1, 2])
    assert client._hold_timer is not None
    client.pause_reading()
    await until(lambda: client._hold_timer is None)
    assert client._transport_paused
    transport = client._transport
    assert transport is not None and not transport.is_reading()  # type: ignore[attr-defined]
    client.resume_reading()
    assert transport.is_reading()  # type: ignore[attr-defined]


async def test_a_connection_lost_during_a_rest_cancels_it(fake):
    got: list[int] = []
    client, conn = await fake.session(on_batch=lambda b: got.extend(p[2] for p in b), read_hold=0.5)
    conn.send(publish(b"a", qos=1, pid=1))
    await until(lambda: got == [1])
    conn.send(publish(b"a", qos=1, pid=2))
    await until(lambda: got == [1, 2])
    timer = client._hold_timer
    assert timer is not None
    conn.close()
    client.abort()
    assert timer.cancelled() and client._hold_timer is None
    assert not mqtt.MQTTClient.connected.fget(client)  # type: ignore[attr-defined]
