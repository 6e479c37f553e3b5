"""The uplink's tail of the last commits (gateway/state.py) says exactly what the store
would: the same records for every position the uplink can ask from, or "ask the store"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.settings import gateway_settings
from gateway.state import State

pytestmark = pytest.mark.timeout(30)


def _state(tmp_path: Path, *extra: str) -> State:
    s = gateway_settings(["--local", "mqtt://127.0.0.1:9", "--cloud", "mqtt://127.0.0.1:9", "--store",
                          str(tmp_path / "store.db"), "--node-id", "tail", "--frame-max-records", "50",
                          "--lane", "events:block:evt/#", "--lane", "telemetry:drop_oldest:dt/#",
                          "--default-lane", "telemetry", *extra])
    st = State(s)
    st.store.open()
    st.opened()
    return st


def _batch(i0: int, n: int) -> list[tuple[str, str, bytes, int, int]]:
    out = []
    for i in range(i0, i0 + n):
        lane, topic = ("events", f"evt/a/{i % 3}") if i % 4 == 0 else ("telemetry", f"dt/d{i % 5}/t")
        out.append((lane, topic, b"p%d" % i * (1 + i % 7), 1_700_000_000_000 + i, i % 65535 + 1))
    return out


def test_tail_answers_like_the_store(tmp_path: Path) -> None:
    async def body() -> None:
        st = _state(tmp_path)
        st.cloud_up = True
        try:
            i = 0
            for n in (1, 7, 60, 130, 3):
                batch = _batch(i, n)
                i += n
                res = st.store.commit(batch, {}, {})
                st.remember(res.inserted, res.first_seq, False)
            checked = 0
            for lane in ("events", "telemetry"):
                for after in range(0, st.store.next_seq + 1):
                    for max_bytes in (1, 300, 10**6):
                        got = st.from_tail(lane, after, 50, max_bytes)
                        want = st.store.read(lane, after, 50, max_bytes)
                        if got is not None:
                            assert got == want, (lane, after, max_bytes)
                            checked += 1
                        else:  # nothing from the tail: the store has nothing new either
                            assert not want or after < st.tail_base.get(lane, 0) or lane not in st.tail
            assert checked > 100
        finally:
            st.store.close()
    asyncio.run(body())


def test_tail_only_when_it_is_complete(tmp_path: Path) -> None:
    async def body() -> None:
        st = _state(tmp_path)
        try:
            st.cloud_up = False
            b1 = _batch(0, 40)
            r1 = st.store.commit(b1, {}, {})
            st.remember(r1.inserted, r1.first_seq, False)  # cloud down: not kept
            assert not st.tail
            st.cloud_up = True
            b2 = _batch(40, 40)
            r2 = st.store.commit(b2, {}, {})
            st.remember(r2.inserted, r2.first_seq, False)
            # records of the first batch are only in the store: the tail does not answer
            assert st.from_tail("telemetry", 0, 50, 10**6) is None
            assert st.from_tail("telemetry", r2.first_seq - 1, 50, 10**6) == \
                st.store.read("telemetry", r2.first_seq - 1, 50, 10**6)
            # a commit that evicted or expired anything empties it
            b3 = _batch(80, 5)
            r3 = st.store.commit(b3, {}, {})
            st.remember(r3.inserted, r3.first_seq, True)
            assert not st.tail and st.from_tail("telemetry", r3.first_seq - 1, 50, 10**6) is None
            # bounded: an uplink that is behind reads the oldest from the store
            st.tail_records = 10
            b4 = _batch(85, 60)
            r4 = st.store.commit(b4, {}, {})
            st.remember(r4.inserted, r4.first_seq, False)
            assert all(len(q) <= 10 for q in st.tail.values())
            assert st.from_tail("telemetry", r4.first_seq - 1, 50, 10**6) is None
            base = st.tail_base["telemetry"]
            assert st.from_tail("telemetry", base, 50, 10**6) == st.store.read("telemetry", base, 50, 10**6)
        finally:
            st.store.close()
    asyncio.run(body())
