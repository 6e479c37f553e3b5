"""Gap notices (gateway/frames.py), the gateway's ledger of what left its store unconfirmed
(gateway/gaps.py), and gaps in the sinks (gateway/sinks.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.mqtt import Message
from gateway.errors import FrameError
from gateway.frames import SEQ_MAX, Frame, Gap, decode, decode_message, encode, encode_gap
from gateway.gaps import BROKER_ACKED, STORE_FULL, TTL, Ledger
from gateway.ingest import Ingest
from gateway.settings import gateway_settings, ingest_settings
from gateway.sinks import gaps_path, open_sink, read_gaps, read_sink
from gateway.state import State
from gateway.store import LaneSpec, Store
from gateway.topics import nack_topic, uplink_topic
from gateway.uplink import Uplink

# ---------------------------------------------------------------- the notice


def test_gap_notice_round_trip_and_frames_still_decode():
    data = encode_gap("pi-1", 7, "telemetry", 100, 250, 42, BROKER_ACKED)
    assert decode_message(data) == Gap("pi-1", 7, "telemetry", 100, 250, 42, BROKER_ACKED)
    unknown = decode_message(encode_gap("pi-1", 7, "events", 3, SEQ_MAX, None, "store re-created"))
    assert isinstance(unknown, Gap) and unknown.missing is None and unknown.upto == SEQ_MAX
    frame = encode("pi-1", 7, "telemetry", [(251, 1, "dt/a", b"x")], prev_seq=250)
    assert isinstance(decode_message(frame), Frame)
    with pytest.raises(FrameError, match="bad magic"):
        decode(data)  # an older reader drops a gap notice as a bad frame, never misreads it


@pytest.mark.parametrize("cut", [0, 1, 10, 37, 38, 40])
def test_truncated_or_padded_gap_notice_is_refused(cut):
    data = encode_gap("pi-1", 7, "telemetry", 100, 250, 42, "ttl")
    with pytest.raises(FrameError):
        decode_message(data[:cut] if cut < 40 else data + b"\x00")


def test_gap_notice_checks_its_fields():
    with pytest.raises(ValueError):
        encode_gap("n", 1, "l", 5, 5, 0, "r")
    with pytest.raises(ValueError):
        encode_gap("n" * 256, 1, "l", 1, 5, 0, "r")
    bad = bytearray(encode_gap("n", 1, "l", 1, 5, 0, "r"))
    bad[12:20] = (9).to_bytes(8, "little")  # after > upto
    with pytest.raises(FrameError, match="after"):
        decode_message(bytes(bad))


# ---------------------------------------------------------------- the ledger


def test_ledger_counts_exactly_what_left_unconfirmed_in_a_range():
    led = Ledger({"telemetry": 0, "events": 0})
    led.removed("telemetry", [1, 3, 5, 7], BROKER_ACKED)  # 2, 4, 6 are another lane's
    led.removed("telemetry", [5, 7, 9, 11], TTL)  # 5 and 7 are there already
    assert led.missing("telemetry", 0, 100) == (6, 11, f"{BROKER_ACKED}; {TTL}")
    assert led.missing("telemetry", 3, 9) == (2, 7, BROKER_ACKED)
    assert led.missing("telemetry", 7, 100) == (2, 11, TTL)
    assert led.missing("telemetry", 11, 100) == (0, 11, "")
    assert led.missing("events", 0, 100) == (0, 0, "")
    led.confirmed("telemetry", 5)  # ingest holds up to 5
    assert led.size("telemetry") == 3
    assert led.missing("telemetry", 5, 100) == (3, 11, f"{BROKER_ACKED}; {TTL}")
    assert led.missing("telemetry", 0, 100)[0] is None  # below what ingest confirmed: unknown


def test_ledger_forgets_beyond_its_limit_and_then_says_unknown():
    led = Ledger({"telemetry": 10}, limit=5)
    assert led.missing("telemetry", 3, 20) == (None, 19, "not known (gateway restarted)")
    led.removed("telemetry", range(11, 21), STORE_FULL)
    assert led.size("telemetry") == 5
    assert led.missing("telemetry", 15, 100) == (5, 20, STORE_FULL)
    assert led.missing("telemetry", 14, 100)[0] is None


# ---------------------------------------------------------------- the sinks


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_sink_records_a_gap_once_and_counts_it_as_held_after_a_restart(tmp_path, kind):
    spec = f"{kind}:{tmp_path / ('sink.jsonl' if kind == 'jsonl' else 'sink.db')}"
    sink = open_sink(spec)
    sink.write([("pi-1", 7, "telemetry", 3, 0, "dt/a", b"x")])
    assert sink.write_gap(("pi-1", 7, "telemetry", 3, 250, 42, BROKER_ACKED)) is True
    assert sink.write_gap(("pi-1", 7, "telemetry", 3, 250, 42, BROKER_ACKED)) is False
    assert sink.high[("pi-1", 7, "telemetry")] == 250
    sink.close()
    again = open_sink(spec)
    assert again.high[("pi-1", 7, "telemetry")] == 250
    assert again.write_gap(("pi-1", 7, "telemetry", 3, 250, 42, BROKER_ACKED)) is False
    again.close()
    [gap] = read_gaps(spec)
    assert (gap["node"], gap["lane"], gap["after"], gap["upto"], gap["missing"]) == (
        "pi-1", "telemetry", 3, 250, 42)
    assert len(read_sink(spec)) == 1  # the records are untouched
    if kind == "jsonl":
        assert gaps_path(tmp_path / "sink.jsonl") == tmp_path / "sink.gaps.jsonl"


# ---------------------------------------------------------------- across a restart


def test_store_remembers_per_lane_up_to_where_it_removed_records(tmp_path):
    """The ledger is in memory; the store keeps, per lane, the highest seq it removed, so
    that after a restart a resend request below it is a gap of unknown size and one above
    it is not a gap at all (seqs of other lanes lie in between)."""
    lanes = [LaneSpec("events", ("evt/#",), "block"), LaneSpec("telemetry", ("dt/#",), "drop_oldest")]
    s = Store(tmp_path / "s.db", lanes, max_bytes=10_000)
    s.open()

    def rec(lane, size=10):
        return (lane, "evt/a" if lane == "events" else "dt/a", b"x" * size, int(time.time() * 1000), 0)

    s.commit([rec("telemetry") for _ in range(5)] + [rec("events") for _ in range(5)])  # 1-5, 6-10
    s.commit([], deletes={"telemetry": 3})  # chunk 1-5 is not all delivered: nothing goes
    assert s.removed_upto == {}
    s.commit([], deletes={"telemetry": 5})
    assert s.removed_upto == {"telemetry": 5}
    res = s.commit([rec("telemetry", 3000) for _ in range(4)])  # 11-14: over 10,000 bytes
    assert res.evicted_seqs["telemetry"] and s.removed_upto["telemetry"] == res.evicted_seqs["telemetry"][-1]
    evicted_upto = s.removed_upto["telemetry"]
    s.close()
    s = Store(tmp_path / "s.db", lanes, max_bytes=10_000)
    s.open()
    assert s.removed_upto == {"telemetry": evicted_upto}
    led = Ledger({lane: s.removed_upto.get(lane, 0) for lane in ("events", "telemetry")})
    assert led.missing("telemetry", evicted_upto, 100) == (0, evicted_upto, "")
    assert led.missing("telemetry", 5, evicted_upto + 1)[0] is None
    assert led.missing("events", 5, 100) == (0, 5, "")
    s.close()


# ---------------------------------------------------------------- ingest ahead of a hole


class _NackClient:
    """Stands in for ingest's MQTT client: keeps what ingest publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    async def publish_nowait(self, topic: str, body: bytes, qos: int, retain: bool = False) -> None:
        self.sent.append((topic, json.loads(body)))


def _ingest(tmp_path: Path, kind: str) -> tuple[Ingest, Callable[[bytes], Message], Path]:
    """Ingest with a ``kind`` sink and no broker (its ``_process`` is called directly), the
    message of node pi-1's telemetry lane for a payload, and the sink's path."""
    path = tmp_path / ("sink.jsonl" if kind == "jsonl" else "sink.db")
    ing = Ingest(ingest_settings(["--cloud", "mqtt://127.0.0.1:9", "--sink", f"{kind}:{path}",
                                  "--downlink", "off"]))
    ing.sink = open_sink(f"{kind}:{path}")
    topic = uplink_topic("pi-1", "telemetry")

    def msg(data: bytes) -> Message:
        return Message(topic, data, 1, False, False, 1)

    return ing, msg, path


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_ingest_keeps_frames_ahead_of_a_hole_until_the_gap_notice_comes(tmp_path, kind):
    # under --confirm broker the gateway may have removed the frames after the hole by
    # the time it answers the nack (their PUBACK): ingest must write the ones it received
    ing, msg, path = _ingest(tmp_path, kind)
    first = encode("pi-1", 7, "telemetry", [(s, 1, "dt/a", b"x") for s in (1, 2, 3)], prev_seq=0)
    ahead = [encode("pi-1", 7, "telemetry", [(s, 1, "dt/a", b"y") for s in (11, 12)], prev_seq=10),
             encode("pi-1", 7, "telemetry", [(s, 1, "dt/a", b"z") for s in (13, 14)], prev_seq=12)]
    key = ("pi-1", 7, "telemetry")
    written, _, _, gaps = ing._process([msg(first), *map(msg, ahead)])
    assert written == 3 and gaps == {key: 3}
    client = _NackClient()
    asyncio.run(ing._nack(client, gaps))  # type: ignore[arg-type]
    assert client.sent == [(nack_topic("pi-1"), {"epoch": 7, "lane": "telemetry", "after": 3, "held_after": 10})]
    notice = encode_gap("pi-1", 7, "telemetry", 3, 10, 7, BROKER_ACKED)
    written, _, acks, gaps = ing._process([msg(notice), msg(ahead[0])])  # and a resend of one
    assert (written, gaps, acks) == (4, {}, {("pi-1", 7): {"telemetry": 14}})
    assert ing.counters["gap_records"] == 7 and not ing._ahead
    ing.sink.close()
    assert sorted(r["seq"] for r in read_sink(f"{kind}:{path}")) == [1, 2, 3, 11, 12, 13, 14]


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_a_gap_reported_again_is_counted_once(tmp_path, kind):
    # ingest holds 1-3 and asked twice for what follows (a repeated nack); the gateway's
    # first answer announces 4-10 (7 records), its second the same range and what left
    # the store meanwhile, 4-14 (11: the 7 again and 4 more), then the identical first
    # notice arrives again (redelivered after a reconnect). 11 records are lost, not 25.
    ing, msg, path = _ingest(tmp_path, kind)
    key = ("pi-1", 7, "telemetry")
    first = encode("pi-1", 7, "telemetry", [(s, 1, "dt/a", b"x") for s in (1, 2, 3)], prev_seq=0)
    ing._process([msg(first)])
    notice = encode_gap("pi-1", 7, "telemetry", 3, 10, 7, BROKER_ACKED)
    again_further = encode_gap("pi-1", 7, "telemetry", 3, 14, 11, BROKER_ACKED)
    _, _, acks, gaps = ing._process([msg(notice), msg(again_further), msg(notice)])
    assert ing.counters["gap_records"] == 7, "the records of 4-10 were counted again"
    assert acks == {("pi-1", 7): {"telemetry": 10}}
    assert gaps == {key: 10}  # the rest is asked for from what ingest holds ...
    client = _NackClient()
    asyncio.run(ing._nack(client, gaps))  # type: ignore[arg-type]
    assert client.sent == [(nack_topic("pi-1"), {"epoch": 7, "lane": "telemetry", "after": 10})]
    exact = encode_gap("pi-1", 7, "telemetry", 10, 14, 4, BROKER_ACKED)  # ... and answered exactly
    _, _, acks, gaps = ing._process([msg(exact), msg(notice), msg(again_further), msg(exact)])
    assert (acks, gaps) == ({("pi-1", 7): {"telemetry": 14}}, {})
    assert ing.counters["gap_records"] == 11 and ing.counters["gaps"] == 2
    assert ing.status()["gaps"] == [{"node": "pi-1", "lane": "telemetry", "notices": 2, "records": 11, "unknown": 0}]
    ing.sink.close()
    assert [(g["after"], g["upto"], g["missing"]) for g in read_gaps(f"{kind}:{path}")] == [(3, 10, 7), (10, 14, 4)]


# ---------------------------------------------------------------- the gateway's resend


class _CloudClient:
    """Stands in for the uplink's cloud connection: every publish is acknowledged at once
    (the cloud broker's PUBACK) and kept, decoded."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent: list[Frame | Gap] = []
        self._acked = asyncio.Event()  # set after each PUBACK has been handled

    async def publish_nowait(self, topic: str, body: bytes, qos: int) -> asyncio.Future[None]:
        self.sent.append(decode_message(body))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.call_soon(self._puback, fut)
        return fut

    def _puback(self, fut: asyncio.Future[None]) -> None:
        fut.set_result(None)  # queues the uplink's done callbacks ...
        asyncio.get_running_loop().call_soon(self._acked.set)  # ... and this after them

    async def until(self, predicate: Callable[[], object], timeout: float = 5) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds, re-checked after each acknowledged publish, at
        most ``timeout`` s: the caller's assertion then says what was missing."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            pass


def _follow(have: int, sent: list[Frame | Gap]) -> tuple[int, int]:
    """What ingest makes of ``sent`` holding the lane up to ``have``: (held up to, missing)."""
    missing = 0
    for f in sent:
        if isinstance(f, Gap):
            if f.after <= have < f.upto:
                have, missing = f.upto, missing + (f.missing or 0)
        elif f.prev_seq <= have:
            have = max(have, f.records[-1][0])
    return have, missing


def _broker_confirmed(tmp_path) -> State:  # noqa: ANN001
    """A gateway's state under --confirm broker with records 1-20 of lane telemetry
    stored (frames of 5), none sent yet."""
    s = gateway_settings(["--local", "mqtt://127.0.0.1:9", "--cloud", "mqtt://127.0.0.1:9",
                          "--store", str(tmp_path / "store.db"), "--node-id", "pi-1",
                          "--confirm", "broker", "--frame-max-records", "5", "--frame-linger", "0",
                          "--lane", "telemetry:drop_oldest:dt/#", "--default-lane", "telemetry"])
    st = State(s)
    st.store.open()
    st.opened()
    st.ledger = Ledger({"telemetry": 0})
    for i0 in range(0, 20, 5):  # (records leave the store by commit)
        st.store.commit([("telemetry", "dt/a", b"x", 1_700_000_000_000 + i, i + 1) for i in range(i0, i0 + 5)])
    return st


def _nack(up: Uplink, st: State, after: int, held_after: int | None = None) -> None:
    """Ingest's resend request, as the uplink receives it."""
    ask: dict[str, object] = {"epoch": st.store.epoch, "lane": "telemetry", "after": after}
    if held_after is not None:
        ask["held_after"] = held_after
    up._on_message(Message("ef/pi-1/nack", json.dumps(ask).encode(), 0, False, False, 0))


def test_a_repeated_nack_answered_by_the_same_notice_counts_its_records_once(tmp_path):
    # ingest asked twice for lane telemetry after 0 (its first request unanswered within a
    # second) when records 1-20 had left the store at their PUBACK: both answers are the
    # notice for 1-20. The gateway sent two notices and announced 20 records, not 40;
    # ingest, given both, counts 20 too.
    async def body() -> None:
        st = _broker_confirmed(tmp_path)
        up = Uplink(st)
        client = _CloudClient()
        drain = asyncio.create_task(up._drain(client))  # type: ignore[arg-type]
        try:
            await client.until(lambda: st.acked["telemetry"] == 20)
            st.store.commit([], {"telemetry": 20})
            del client.sent[:]
            for n in (1, 2):
                _nack(up, st, 0)
                await client.until(lambda n=n: len(client.sent) == n)
            assert client.sent == 2 * [Gap("pi-1", st.store.epoch, "telemetry", 0, 20, 20, BROKER_ACKED)]
            assert (st.counters["gap_notices"], st.counters["gap_records"]) == (2, 20)
        finally:
            drain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await drain
            st.store.close()
        sink = f"jsonl:{tmp_path / 'sink.jsonl'}"
        ing = Ingest(ingest_settings(["--cloud", "mqtt://127.0.0.1:9", "--sink", sink, "--downlink", "off"]))
        ing.sink = open_sink(sink)
        topic = uplink_topic("pi-1", "telemetry")
        ing._process([Message(topic, encode_gap(g.node, g.epoch, g.lane, g.after, g.upto, g.missing, g.reason),
                              1, False, False, 1) for g in client.sent if isinstance(g, Gap)])
        ing.sink.close()
        assert ing.counters["gap_records"] == 20

    asyncio.run(asyncio.wait_for(body(), 20))


@pytest.mark.parametrize("held_after", [None, 15])
def test_records_that_leave_the_store_during_a_resend_get_a_gap_notice(tmp_path, held_after):
    # --confirm broker: ingest asks for lane telemetry after 0 when records 1-10 are gone
    # (their PUBACK) and 11-20 were sent and acknowledged too; a commit removes 11-20
    # between the gap notice's read and the resend's. Before, the notice covered 1-10, the
    # resend found nothing and the lane stalled: ingest had dropped 11-20 as out of order.
    # With held_after (ingest kept the frames after 15), only 1-15 are announced.
    async def body() -> None:
        st = _broker_confirmed(tmp_path)
        up = Uplink(st)
        client = _CloudClient()
        drain = asyncio.create_task(up._drain(client))  # type: ignore[arg-type]
        try:
            await client.until(lambda: st.acked["telemetry"] == 20)
            assert st.acked["telemetry"] == 20 and st.ledger.size("telemetry") == 20
            st.store.commit([], {"telemetry": 10})
            assert st.store.read("telemetry", 0, 1, 1)[0][0] == 11
            gap_notice = up._gap_notice

            async def then_commit(*args: object) -> int:
                after = await gap_notice(*args)  # type: ignore[arg-type]
                st.store.commit([], {"telemetry": 20})  # lands between the two reads
                return after

            up._gap_notice = then_commit  # type: ignore[method-assign]
            del client.sent[:]
            _nack(up, st, 0, held_after)
            await client.until(lambda: client.sent and _follow(0, client.sent)[0] >= (held_after or 20))
            have, missing = _follow(0, client.sent)
            want = held_after or 20
            assert (have, missing) == (want, want), client.sent
            assert st.counters["gap_records"] == want
        finally:
            drain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await drain
            st.store.close()

    asyncio.run(asyncio.wait_for(body(), 20))


def test_a_gap_notice_stops_where_ingest_holds_frames(tmp_path):
    # --confirm broker: records 1-20 left the store at their PUBACK; the cloud broker lost
    # 1-15 and delivered the frame of 16-20, which ingest keeps ahead of the hole. Its nack
    # says so (held_after 15), and the notice must end there: announcing 1-20 would count
    # 16-20 as lost though ingest writes them (a sink that trusts the notice, PostgreSQL,
    # would drop them as below its high).
    async def body() -> None:
        sink = f"jsonl:{tmp_path / 'sink.jsonl'}"
        ing = Ingest(ingest_settings(["--cloud", "mqtt://127.0.0.1:9", "--sink", sink, "--downlink", "off"]))
        ing.sink = open_sink(sink)
        topic = uplink_topic("pi-1", "telemetry")
        st = _broker_confirmed(tmp_path)
        up = Uplink(st)
        client = _CloudClient()
        drain = asyncio.create_task(up._drain(client))  # type: ignore[arg-type]
        try:
            await client.until(lambda: st.acked["telemetry"] == 20)
            st.store.commit([], {"telemetry": 20})
            delivered = [f for f in client.sent if isinstance(f, Frame) and f.prev_seq == 15]
            del client.sent[:]
            assert [r[0] for r in delivered[0].records] == [16, 17, 18, 19, 20]
            frame = encode("pi-1", st.store.epoch, "telemetry", delivered[0].records, prev_seq=15)
            _, _, _, gaps = ing._process([Message(topic, frame, 1, False, False, 1)])
            asked = _NackClient()
            await ing._nack(asked, gaps)  # type: ignore[arg-type]
            [(_, nack)] = asked.sent
            assert nack["held_after"] == 15
            _nack(up, st, int(nack["after"]), int(nack["held_after"]))  # type: ignore[call-overload]
            await client.until(lambda: client.sent)
            assert client.sent == [Gap("pi-1", st.store.epoch, "telemetry", 0, 15, 15, BROKER_ACKED)]
            assert st.counters["gap_records"] == 15
        finally:
            drain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await drain
            st.store.close()
        [g] = client.sent
        assert isinstance(g, Gap)
        notice = encode_gap(g.node, g.epoch, g.lane, g.after, g.upto, g.missing, g.reason)
        written, _, _, gaps = ing._process([Message(topic, notice, 1, False, False, 1)])
        ing.sink.close()
        assert (written, gaps, ing.counters["gap_records"]) == (5, {}, 15)
        assert [r["seq"] for r in read_sink(sink)] == [16, 17, 18, 19, 20]

    asyncio.run(asyncio.wait_for(body(), 20))
