"""Clocks without a battery: lane TTLs and record ages run on the store clock (monotonic
within a run, continued across restarts), so a wall-clock jump forward or back expires
nothing at once and reorders nothing (gateway/store.py, docs/operations.md)."""

from __future__ import annotations

from gateway.store import LaneSpec, Store

YEAR = 365 * 86400.0
LANES = [LaneSpec("events", ("evt/#",), "block"),
         LaneSpec("telemetry", ("dt/#",), "drop_oldest", ttl=60)]


class FakeClock:
    """An injected clock: the wall clock jumps when told to, the monotonic one only runs."""

    def __init__(self, wall: float = 1_000_000_000.0) -> None:
        self._wall = wall
        self._mono = 5000.0

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    def jump(self, seconds: float) -> None:  # NTP setting the clock
        self._wall += seconds


def _rec(clock: FakeClock, lane: str, i: int) -> tuple[str, str, bytes, int, int]:
    topic = "dt/d/t" if lane == "telemetry" else "evt/a/b"
    return (lane, topic, b"%d" % i, int(clock.wall() * 1000), i)


def _open(path, clock: FakeClock) -> Store:
    s = Store(path, LANES, clock=clock)
    s.open()
    return s


def _seqs(s: Store, lane: str) -> list[int]:
    return [r[0] for r in s.read(lane, 0, 10_000, 1 << 30)]


def test_a_wall_clock_jump_forward_or_back_expires_nothing_and_reorders_nothing(tmp_path):
    clock = FakeClock()
    s = _open(tmp_path / "s.db", clock)
    s.commit([_rec(clock, "telemetry", i) for i in range(10)])
    clock.advance(30)
    clock.jump(+YEAR)  # NTP: the Pi booted in the past
    r = s.commit([_rec(clock, "telemetry", i) for i in range(10, 20)])
    assert r.expired == {}, "a jump forward must not expire a lane at once"
    assert s.age_s("telemetry") == 30.0
    clock.advance(10)
    clock.jump(-2 * YEAR)  # and back, beyond where it started
    r = s.commit([_rec(clock, "telemetry", i) for i in range(20, 30)])
    assert r.expired == {}
    seqs = _seqs(s, "telemetry")
    assert seqs == sorted(seqs) and len(seqs) == 30  # nothing lost, order is the seq
    # the TTL still runs, on the monotonic clock: the first ten are 61 s old
    clock.advance(21)
    r = s.commit([])
    assert r.expired == {"telemetry": (10, r.expired["telemetry"][1])}
    assert _seqs(s, "telemetry")[0] == 11 and s.drops == {"ttl:telemetry": 10}
    # the sink gets each record's wall time as it was read (jumps included)
    ts = [r[1] for r in s.read("telemetry", 0, 10_000, 1 << 30)]
    assert max(ts) - min(ts) > YEAR * 1000 * 0.9
    s.close()


def test_ages_continue_across_a_restart_counting_plausible_downtime_only(tmp_path):
    clock = FakeClock()
    s = _open(tmp_path / "s.db", clock)
    s.commit([_rec(clock, "telemetry", i) for i in range(5)])
    clock.advance(20)
    s.close()
    # off for 25 s by a wall clock that kept time: counted
    clock.advance(25)
    s = _open(tmp_path / "s.db", clock)
    assert s.age_s("telemetry") == 45.0
    assert s.commit([]).expired == {}
    clock.advance(16)  # 61 s in the store
    assert s.commit([]).expired["telemetry"][0] == 5
    s.commit([_rec(clock, "telemetry", i) for i in range(5, 8)])
    s.close()
    # off, and the wall clock set a year forward meanwhile: not counted (nothing expires)
    clock.advance(5)
    clock.jump(YEAR)
    s = _open(tmp_path / "s.db", clock)
    assert s.age_s("telemetry") == 0.0
    assert s.commit([]).expired == {}
    clock.advance(61)
    assert s.commit([]).expired["telemetry"][0] == 3
    s.close()
    # the wall clock set back (a Pi restoring an old time at boot): nothing counted either
    s = _open(tmp_path / "s.db", clock)
    s.commit([_rec(clock, "telemetry", 9)])
    s.close()
    clock.jump(-YEAR)
    s = _open(tmp_path / "s.db", clock)
    assert s.age_s("telemetry") == 0.0
    s.close()


def test_a_schema_2_store_is_migrated_with_wall_clock_ages(tmp_path):
    import sqlite3

    clock = FakeClock()
    s = _open(tmp_path / "s.db", clock)
    s.commit([_rec(clock, "telemetry", i) for i in range(3)])
    s.close()
    db = sqlite3.connect(tmp_path / "s.db")
    for table in ("chunks_events", "chunks_telemetry"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN clock")
    db.execute("DELETE FROM meta WHERE key IN ('clock_ms', 'clock_wall')")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    clock.advance(40)
    s = _open(tmp_path / "s.db", clock)
    assert s.age_s("telemetry") == 40.0 and s.lanes["telemetry"].count == 3
    clock.advance(21)
    assert s.commit([]).expired["telemetry"][0] == 3
    s.close()
