"""Frame encoding (docs/wire-format.md): round trips and clear errors on bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import FrameError
from gateway.frames import FRAME_VERSION, decode, encode

records_st = st.lists(
    st.tuples(
        st.integers(0, 2**31),
        st.integers(0, 2**41),
        st.sampled_from(["dt/a/t", "dt/b/h", "evt/x/y", "dt/ü/∆"]),
        st.binary(max_size=300),
    ),
    min_size=1,
    max_size=50,
)


def _ascending(recs):
    out, seq = [], 10**9
    for delta, ts, topic, payload in recs:
        seq += 1 + delta % 1000
        out.append((seq, ts, topic, payload))
    return out


@settings(max_examples=150, deadline=None)
@given(records_st, st.booleans())
def test_round_trip(recs, compress):
    records = _ascending(recs)
    prev = records[0][0] - 1 - recs[0][0] % 7
    data = encode("node-1", 1795805035151766, "telemetry", records, compress=compress, prev_seq=prev)
    f = decode(data)
    assert (f.node, f.epoch, f.lane, f.prev_seq) == ("node-1", 1795805035151766, "telemetry", prev)
    assert f.records == records


def test_header_carries_version():
    data = encode("n", 1, "events", [(1, 2, "t", b"x")])
    assert data[:2] == b"EF" and data[2] == FRAME_VERSION


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"XX" + d[2:], "bad magic"),
        (lambda d: d[:2] + bytes([99]) + d[3:], "unsupported frame version 99"),
        (lambda d: d[:10], "too short"),
        (lambda d: d[:-3], "truncated"),
        (lambda d: d + b"junk", "stray bytes"),
        (lambda d: b"", "too short"),
    ],
)
def test_bad_frames_raise_frame_error(mutate, message):
    good = encode("n", 1, "events", [(1, 2, "t", b"hello"), (2, 3, "t", b"world")])
    with pytest.raises(FrameError, match=message):
        decode(mutate(good))


def test_random_garbage_never_raises_anything_but_frame_error():
    import random

    rng = random.Random(7)
    good = encode("n", 1, "events", [(i, i, f"t/{i % 3}", b"p" * i) for i in range(1, 30)])
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode(bytes(data))
        except FrameError:
            pass


def test_empty_frame_refused():
    with pytest.raises(ValueError):
        encode("n", 1, "events", [])


def test_prev_seq_must_precede_the_records():
    with pytest.raises(ValueError):
        encode("n", 1, "events", [(5, 0, "t", b"")], prev_seq=5)
