"""The intake's batch path (issue 15) against its per-message path: the same batches of
raw PUBLISHes (several lanes, retained, oversize, a store that fills up, a block lane
that starts holding) leave exactly the same pending batch, byte counts, counters,
rejections, held messages and acknowledgements. No broker: the intake's own code."""

from __future__ import annotations

import random

import pytest

from gateway.intake import Intake
from gateway.settings import gateway_settings
from gateway.state import State

pytestmark = pytest.mark.timeout(60)

TOPICS = ["dt/a/temp", "dt/b/temp", "dt/é/hum", "evt/door", "evt/alarm/x", "misc/other"]


def _intake(tmp_path, name: str, max_store: int) -> tuple[Intake, State, list[int]]:
    s = gateway_settings(["--local", "mqtt://127.0.0.1:9", "--cloud", "mqtt://127.0.0.1:9",
                          "--store", str(tmp_path / f"{name}.db"), "--node-id", "t",
                          "--uplink", "#", "--max-message-bytes", "600",
                          "--max-store-bytes", str(max_store)])
    st = State(s)
    st.store.open()
    st.opened()
    intake = Intake(st)
    client = intake._new_client()
    client._got_connack = True
    client._alive = True
    acks: list[int] = []
    client.ack = acks.append  # type: ignore[method-assign]
    client.pause_reading = lambda: None  # type: ignore[method-assign]
    return intake, st, acks


def _state(st: State, acks: list[int]) -> dict[str, object]:
    return {
        "pending": [(r[0], r[1], r[2], r[4]) for r in st.pending],  # not the receipt time
        "used": st.used, "pending_bytes": dict(st.pending_bytes), "pending_size": st.pending_size,
        "counters": dict(st.counters), "rejected": dict(st.rejected), "drops": dict(st.new_drops),
        "held": {k: [(m.topic, m.payload, m.pid) for m in v] for k, v in st.held.items()},
        "acks": list(acks),
    }


@pytest.mark.parametrize("seed", range(12))
def test_batches_end_as_message_by_message(tmp_path, seed):
    rnd = random.Random(seed)
    max_store = rnd.choice([4_000, 20_000, 10**8])
    a, sta, acks_a = _intake(tmp_path, "a", max_store)
    b, stb, acks_b = _intake(tmp_path, "b", max_store)
    pid = 0
    for _ in range(40):
        batch = []
        topics = rnd.sample(TOPICS, rnd.randint(1, 3))
        for _ in range(rnd.randint(1, 30)):
            pid = pid % 65535 + 1
            retain = rnd.random() < 0.05
            size = 700 if rnd.random() < 0.05 else rnd.randint(0, 200)
            batch.append((rnd.choice(topics), bytes([pid % 256]) * size, pid, 0x33 if retain else 0x32))
        a._on_batch(batch)
        stb.counters["received"] += len(batch)
        b._each(batch, 0)
        assert _state(sta, acks_a) == _state(stb, acks_b)
    assert sta.counters["received"] > 0 and sta.pending


def test_one_lane_batch_takes_the_column_path(tmp_path):
    """The common case really is taken whole: one receipt time for the batch."""
    a, st, _ = _intake(tmp_path, "a", 10**8)
    a._on_batch([(f"dt/d{i % 3}/t", b"x" * 50, i + 1, 0x32) for i in range(100)])
    assert len(st.pending) == 100 and len({r[3] for r in st.pending}) == 1
    assert st.pending_bytes == {"telemetry": st.pending_size} and st.used == st.pending_size


def test_reading_waits_while_pending_and_committing_fill_the_bound(tmp_path, monkeypatch):
    """The pause bound counts the batch being committed: with a commit in flight the
    intake stops reading sooner, and reads again only once that commit ended."""
    import gateway.intake as intake_mod

    monkeypatch.setattr(intake_mod, "MAX_PENDING", 100)
    monkeypatch.setattr(intake_mod, "COMMIT_RECORDS", 40)  # the bound is checked once a batch is full
    a, st, _ = _intake(tmp_path, "a", 10**8)
    paused: list[bool] = []
    assert a.client is not None
    a.client.pause_reading = lambda: paused.append(True)  # type: ignore[method-assign]
    a.client.resume_reading = lambda: paused.append(False)  # type: ignore[method-assign]

    def read(n: int, first_pid: int) -> None:
        a._on_batch([("dt/d/t", b"x" * 10, first_pid + i, 0x32) for i in range(n)])

    read(60, 1)  # full (40), but 60 in hand
    assert paused == []
    # the committer takes these 60 (gateway/committer.py): they are in hand until committed
    st.committing, st.committing_size, st.pending, st.pending_size = len(st.pending), st.pending_size, [], 0
    a.took_batch()
    assert paused == []
    read(50, 61)  # 50 pending + 60 committing: over 100
    assert paused == [True]
    a.took_batch()  # nothing was taken since: still no room
    assert paused == [True]
    st.committing = st.committing_size = 0  # the commit ended
    a.took_batch()
    assert paused == [True, False]
