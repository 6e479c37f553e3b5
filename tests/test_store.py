"""The SQLite store: sequence numbers, epochs, bounds, TTL, corrupt files."""

import time

import pytest

from gateway.store import RECORD_OVERHEAD, LaneSpec, Store, inspect

LANES = [LaneSpec("events", ("evt/#",), "block"), LaneSpec("telemetry", ("dt/#",), "drop_oldest", ttl=0)]


def rec(lane, i, size=10, ts=None):
    topic = "dt/d/t" if lane == "telemetry" else "evt/a/b"
    return (lane, topic, b"x" * size, ts if ts is not None else int(time.time() * 1000), i % 65535 + 1)


def open_store(path, **kw):
    s = Store(path, kw.pop("lanes", LANES), **kw)
    s.open()
    return s


def test_seq_never_repeats_after_delete_and_reopen(tmp_path):
    s = open_store(tmp_path / "s.db")
    r = s.commit([rec("telemetry", i) for i in range(10)])
    assert (r.first_seq, r.last_seq) == (1, 10)
    # deliver everything: the table is empty, the highest seq is gone
    r = s.commit([], deletes={"telemetry": 10})
    assert r.deleted["telemetry"][0] == 10
    s.close()
    s = open_store(tmp_path / "s.db")
    assert s.next_seq == 11
    r = s.commit([rec("events", 1)])
    assert r.first_seq == 11
    s.close()


def test_epoch_is_kept_and_a_new_file_gets_a_new_one(tmp_path):
    s = open_store(tmp_path / "a.db")
    e1 = s.epoch
    s.close()
    assert open_store(tmp_path / "a.db").epoch == e1
    assert open_store(tmp_path / "b.db").epoch != e1


def test_corrupt_file_is_moved_aside_and_a_fresh_store_starts(tmp_path, caplog):
    p = tmp_path / "s.db"
    p.write_bytes(b"this is not sqlite at all" * 100)
    s = open_store(p)
    assert s.moved_aside is not None and s.moved_aside.exists()
    assert s.moved_aside.read_bytes().startswith(b"this is not sqlite")
    assert s.commit([rec("events", 1)]).first_seq == 1
    assert "moved aside" in caplog.text


def test_truncated_sqlite_file_is_moved_aside(tmp_path):
    p = tmp_path / "s.db"
    s = open_store(p)
    s.commit([rec("events", i, 500) for i in range(200)])
    s.close()
    data = p.read_bytes()
    for side in ("-wal", "-shm"):
        (tmp_path / f"s.db{side}").unlink(missing_ok=True)
    p.write_bytes(data[:4096] + b"\x00garbage" * 600)
    s = open_store(p)
    assert s.moved_aside is not None
    assert sum(ln.count for ln in s.lanes.values()) == 0


def test_full_store_evicts_oldest_telemetry_and_counts(tmp_path):
    size = 100
    per = len("dt/d/t") + size + RECORD_OVERHEAD
    s = open_store(tmp_path / "s.db", max_bytes=per * 10)
    s.commit([rec("telemetry", i, size) for i in range(10)])
    r = s.commit([rec("telemetry", i, size) for i in range(10, 14)])
    assert r.evicted["telemetry"][0] == 4
    assert s.lanes["telemetry"].count == 10
    assert s.drops == {"store_full:telemetry": 4}
    rows = s.read("telemetry", 0, 100, 10**9)
    assert [r[0] for r in rows] == list(range(5, 15))  # the oldest four are gone
    s.close()
    # drop counters survive a restart
    assert open_store(tmp_path / "s.db", max_bytes=per * 10).drops == {"store_full:telemetry": 4}


def test_events_are_never_evicted(tmp_path):
    per = len("evt/a/b") + 100 + RECORD_OVERHEAD
    s = open_store(tmp_path / "s.db", max_bytes=per * 5)
    s.commit([rec("events", i, 100) for i in range(8)])  # over the bound: nothing to evict
    assert s.lanes["events"].count == 8
    assert s.drops == {}


def test_ttl_expires_old_records(tmp_path):
    """Age is time spent in the store (the store clock, tests/test_clocks.py), not the
    record's wall-clock timestamp: records stored 120 s ago expire under a 60 s TTL."""
    from tests.test_clocks import FakeClock

    clock = FakeClock()
    lanes = [LaneSpec("events", ("evt/#",), "block"), LaneSpec("telemetry", ("dt/#",), "drop_oldest", ttl=60)]
    s = open_store(tmp_path / "s.db", lanes=lanes, clock=clock)
    s.commit([rec("telemetry", i) for i in range(5)])
    clock.advance(120)
    r = s.commit([rec("telemetry", 9)])
    assert r.expired == {"telemetry": (5, 5 * (6 + 10 + RECORD_OVERHEAD))}
    assert s.lanes["telemetry"].count == 1
    assert s.drops["ttl:telemetry"] == 5


def test_read_respects_byte_bound_but_returns_at_least_one(tmp_path):
    s = open_store(tmp_path / "s.db")
    s.commit([rec("telemetry", i, 1000) for i in range(10)])
    assert len(s.read("telemetry", 0, 100, 2500)) == 2
    assert len(s.read("telemetry", 0, 100, 10)) == 1


def test_inspect_reads_backlog_without_the_gateway(tmp_path):
    s = open_store(tmp_path / "s.db", node_id="n1")
    s.commit([rec("telemetry", i) for i in range(3)])
    s.close()
    info = inspect(tmp_path / "s.db")
    assert info["lanes"]["telemetry"]["records"] == 3
    assert info["node_id"] == "n1"


@pytest.mark.parametrize("bad", [dict(name="Bad"), dict(when_full="sometimes"), dict(ttl=-1)])
def test_lane_spec_validation(bad):
    args = dict(name="ok", filters=("a/#",), when_full="block", ttl=0) | bad
    with pytest.raises(ValueError):
        LaneSpec(**args)


def test_schema_1_store_is_migrated_to_chunks(tmp_path):
    import sqlite3

    p = tmp_path / "old.db"
    db = sqlite3.connect(p)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('epoch','42'),('seq_floor','3'),('drops','{}'),('node_id','n'),('created','0');"
        "CREATE TABLE lane_telemetry (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, pid INTEGER NOT NULL,"
        " sz INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);"
        "PRAGMA user_version=1;"
    )
    db.executemany("INSERT INTO lane_telemetry VALUES (?,?,?,?,?,?)",
                   [(s, 1000 + s, s, 40, "dt/a/b", b"p%d" % s) for s in range(4, 2504)])
    db.commit()
    db.close()
    s = open_store(p)
    assert s.epoch == 42 and s.next_seq == 2504
    assert s.lanes["telemetry"].count == 2500
    rows = s.read("telemetry", 1000, 10, 10**9)
    assert [r[0] for r in rows] == list(range(1001, 1011)) and rows[0][3] == b"p1001"


def test_read_spans_chunks_and_partly_delivered_chunks_stay(tmp_path):
    s = open_store(tmp_path / "s.db")
    for _ in range(3):
        s.commit([rec("telemetry", i, 10) for i in range(700)])  # 3 chunks of 700
    rows = s.read("telemetry", 650, 1000, 10**9)
    assert [r[0] for r in rows] == list(range(651, 1651))
    r = s.commit([], deletes={"telemetry": 1000})  # the first chunk goes, the second stays
    assert r.deleted == {"telemetry": (700, 700 * (6 + 10 + RECORD_OVERHEAD))}
    assert s.read("telemetry", 1000, 5, 10**9)[0][0] == 1001
    assert len(s.recent_hashes(100)) == 100


def _chunks_by_the_book(recs, first_seq):
    """The chunk layout by the rule, record by record: a chunk takes records while it
    holds fewer than CHUNK_RECORDS and fewer than CHUNK_BYTES bytes."""
    from gateway.store import CHUNK_BYTES, CHUNK_RECORDS
    out, start = [], 0
    while start < len(recs):
        end, size = start, 0
        while end < len(recs) and end - start < CHUNK_RECORDS and size < CHUNK_BYTES:
            size += len(recs[end][0]) + len(recs[end][1]) + RECORD_OVERHEAD
            end += 1
        out.append((first_seq + start, first_seq + end - 1, end - start, size))
        start = end
    return out


@pytest.mark.parametrize("sizes", [
    [10] * 2500,                                   # cut by CHUNK_RECORDS
    [100_000, 100_000, 56_000, 5, 200_000, 1],     # cut by CHUNK_BYTES, at and past it
    [262_144 - 6 - RECORD_OVERHEAD, 1, 262_144, 7],  # a record exactly filling a chunk
    [(i * 7919) % 3000 for i in range(1500)],       # mixed
])
def test_a_commit_cuts_chunks_by_the_rule(tmp_path, sizes):
    """Store.commit's chunking (cumulative sizes and a bisection) gives exactly the chunks
    the record-by-record rule gives, and every record reads back as it went in."""
    s = open_store(tmp_path / "s.db", max_bytes=10**9)
    inserts = [("telemetry", "dt/d/t", bytes([i % 251]) * n, 1000 + i, i % 65535 + 1)
               for i, n in enumerate(sizes)]
    first = s.next_seq
    s.commit(inserts)
    rows = s._db.execute("SELECT first_seq, last_seq, n, bytes FROM chunks_telemetry "
                         "ORDER BY first_seq").fetchall()
    assert rows == _chunks_by_the_book([i[1:] for i in inserts], first)
    got = s.read("telemetry", 0, len(inserts), 10**10)
    assert got == [(first + i, r[3], r[1], r[2], r[4]) for i, r in enumerate(inserts)]

