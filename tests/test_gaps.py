"""Gap notices (gateway/frames.py), the gateway's ledger of what left its store unconfirmed
(gateway/gaps.py), and gaps in the sinks (gateway/sinks.py)."""

from __future__ import annotations

import time

import pytest

from gateway.errors import FrameError
from gateway.frames import SEQ_MAX, Frame, Gap, decode, decode_message, encode, encode_gap
from gateway.gaps import BROKER_ACKED, STORE_FULL, TTL, Ledger
from gateway.sinks import gaps_path, open_sink, read_gaps, read_sink
from gateway.store import LaneSpec, Store

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
