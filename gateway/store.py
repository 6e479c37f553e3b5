"""The gateway's SQLite store: a bounded, crash-safe backlog, one table per lane.

Records are kept in *chunks*: one row holds the records of one lane from one commit
(at most :data:`CHUNK_RECORDS` of them), packed into a blob with the topics interned.
A row per message would cost SQLite a cell, an index entry and a partly rewritten page
per record; a chunk costs about 20 bytes per record on top of its payload, and whole
pages. That is what keeps the bytes written to an SD card near twice the payload (the
WAL, then the checkpoint) instead of five times.

Every record gets the node's next sequence number. Numbers never repeat: the store keeps
``seq_floor`` (the highest number it ever removed) in its meta table, and the next number
is one above the larger of that and the highest number still stored. Per lane it also
keeps ``removed_upto``, the highest number of that lane it removed (delivered, evicted or
expired): after a restart the gateway still knows whether a resend request reaches back
to records it no longer has (gateway/gaps.py). A new store file
gets a new *epoch* (creation time in ms times 1000 plus a random 0..999), so ``(epoch,
seq)`` is unique for a node even when the file is lost and re-created.

Writes are grouped: one transaction carries a batch of new records, the removal of
records the cloud acknowledged, evictions for space and TTL expiry. Space is counted in
*record bytes* (topic + payload + :data:`RECORD_OVERHEAD`), not file bytes; the file is
larger by SQLite's page slack and the WAL (bounded by ``journal_size_limit``).

Durability (``sync``): ``full`` makes SQLite fsync the WAL at every commit, so a message
the gateway acknowledged to the local broker survives power loss; ``normal`` fsyncs only
at checkpoints: a kill -9 still loses nothing, but a power cut may lose the last commits
(up to the ``wal_autocheckpoint`` interval) after the broker already forgot them.

Clocks: a record's ``ts`` is the wall clock when the gateway received it, carried to
the sink as it was (a Pi without a real-time clock may send years-wrong times until NTP
sets the clock). Ages and TTLs never use it: each chunk also holds the *store clock* of
its commit, milliseconds that run with the monotonic clock while the gateway runs and
continue from the persisted value at the next start, adding the downtime only when the
wall clock moved forward by a plausible amount (at most :data:`MAX_CREDITED_DOWNTIME`)
meanwhile. A wall-clock jump, forward or back, expires nothing and reorders nothing
(order is the sequence number). The clock is injectable (:class:`Clock`) for tests.

All methods are blocking; the gateway calls them from one writer thread and one reader
thread (each with its own connection), never from the event loop.

Size: one class around one SQLite file. The schema and its migrations, the grouped
commit (inserts, removals, evictions and expiry in one transaction) and the reads share
the lanes' bookkeeping (counts, bytes, oldest record, the sequence floor, the store
clock); split apart they would share that private state across modules.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import struct
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add, itemgetter
from pathlib import Path
from typing import Any

from gateway.errors import StoreCorrupt, StoreError
from gateway.frames import pack_topics, read_topics

__all__ = ["RECORD_OVERHEAD", "Clock", "LaneSpec", "LaneState", "Store", "CommitResult", "record_size",
           "inspect"]

log = logging.getLogger("edgeferry.store")

RECORD_OVERHEAD = 24
"""Bytes counted per record on top of its topic and payload (row header, seq, ts)."""

SCHEMA_VERSION = 3
MAX_CREDITED_DOWNTIME = 7 * 86400.0
"""Seconds of downtime (by the wall clock, between the last write and the next start)
counted towards record ages; a larger or negative move of the wall clock is taken as
the clock being set, not as time passed, and counts nothing."""
CLOCK_PERSIST_S = 10.0


class Clock:
    """Where the store reads time: ``wall()`` (time.time) and ``monotonic()``."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = Clock()
CHUNK_RECORDS = 1000
"""Records per chunk at most (a frame's worth: the uplink decodes one or two per frame)."""
CHUNK_BYTES = 256 * 1024
_LANE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SQLITE_MAGIC = b"SQLite format 3\x00"


_TOPIC = itemgetter(2)  # of a Record
_PAYLOAD = itemgetter(3)


def record_size(topic: str, payload: bytes) -> int:
    """What one record counts against ``max_store_bytes``."""
    return len(topic) + len(payload) + RECORD_OVERHEAD


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """A lane: which topics go to it and what happens when the store is full."""

    name: str
    filters: tuple[str, ...]
    when_full: str = "drop_oldest"  # or "block"
    ttl: float = 0.0  # seconds; 0 keeps records until delivered

    def __post_init__(self) -> None:
        if not _LANE_NAME.match(self.name):
            raise ValueError(f"lane name {self.name!r} must match [a-z][a-z0-9_]{{0,31}}")
        if self.when_full not in ("drop_oldest", "block"):
            raise ValueError(f"lane {self.name}: when_full must be drop_oldest or block")
        if self.ttl < 0:
            raise ValueError(f"lane {self.name}: ttl must be >= 0")


@dataclass(slots=True)
class LaneState:
    """What a lane holds right now (kept in memory, rebuilt at open)."""

    spec: LaneSpec
    count: int = 0
    bytes: int = 0
    oldest_ts: int | None = None  # ms, wall clock
    newest_seq: int = 0
    oldest_clock: int | None = None  # ms, store clock (ages)

    @property
    def table(self) -> str:
        return f"chunks_{self.spec.name}"


@dataclass(slots=True)
class CommitResult:
    """What one commit did: the seq range it gave out and what it removed, per lane."""

    first_seq: int = 0
    last_seq: int = 0
    deleted: dict[str, tuple[int, int]] = field(default_factory=dict)  # delivered
    evicted: dict[str, tuple[int, int]] = field(default_factory=dict)  # store full
    expired: dict[str, tuple[int, int]] = field(default_factory=dict)  # ttl
    # seqs of the records evicted / expired, per lane (ascending): gateway/gaps.py
    evicted_seqs: dict[str, list[int]] = field(default_factory=dict)
    # the records stored, per lane (seq, ts, topic, payload, pid): the uplink's tail
    inserted: dict[str, list[Record]] = field(default_factory=dict)
    expired_seqs: dict[str, list[int]] = field(default_factory=dict)


_REC = struct.Struct("<IqHHI")  # seq delta, ts ms, topic index, packet id, payload length

Record = tuple[int, int, str, bytes, int]  # seq, ts ms, topic, payload, local packet id


def pack(records: list[Record]) -> bytes:
    """Pack records (ascending seq) into a chunk blob."""
    base = records[0][0]
    topics: dict[str, int] = {}
    parts: list[bytes] = []
    pk = _REC.pack
    for seq, ts, topic, payload, pid in records:
        idx = topics.get(topic)
        if idx is None:
            idx = topics[topic] = len(topics)
        parts.append(pk(seq - base, ts, idx, pid, len(payload)))
        parts.append(payload)
    return pack_topics(topics) + b"".join(parts)


def unpack(base: int, data: bytes, after: int = -1, limit: int = 1 << 62) -> list[Record]:
    """The records of a chunk blob whose first record has seq ``base``: those above
    ``after``, at most ``limit`` (the uplink reads a frame's worth; chunks and frames do
    not start at the same seqs, and a record passed over costs no tuple)."""
    topics, pos = read_topics(data)
    out: list[Record] = []
    up = _REC.unpack_from
    size = _REC.size
    n = len(data)
    while pos < n:
        delta, ts, idx, pid, plen = up(data, pos)
        pos += size
        if base + delta > after:
            if len(out) >= limit:
                break
            out.append((base + delta, ts, topics[idx], data[pos : pos + plen], pid))
        pos += plen
    return out


class Store:
    """A bounded SQLite backlog. See the module docstring for the guarantees."""

    def __init__(
        self,
        path: str | Path,
        lanes: list[LaneSpec],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        sync: str = "full",
        node_id: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if sync not in ("full", "normal"):
            raise ValueError("sync must be 'full' or 'normal'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.sync = sync
        self.node_id = node_id
        self.lanes = {spec.name: LaneState(spec) for spec in lanes}
        self.epoch = 0
        self.next_seq = 1
        self.drops: dict[str, int] = {}
        self.moved_aside: Path | None = None
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._last_ttl: float | None = None
        self.clock = clock
        self._clock_start = 0  # store clock (ms) at _mono0
        self._mono0 = clock.monotonic()
        self._clock_saved = -CLOCK_PERSIST_S

    # ------------------------------------------------------------ open / close

    def open(self) -> None:
        """Open (or create) the store. A file that is not a usable store is moved aside
        to ``PATH.corrupt-<unix time>`` and a fresh store with a new epoch is created."""
        try:
            self._open()
        except (sqlite3.DatabaseError, StoreCorrupt) as e:
            self.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("store %s is not usable (%s); moved aside to %s, starting a new store",
                      self.path, e, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                side = Path(str(self.path) + suffix)
                if side.exists():
                    os.replace(side, Path(str(aside) + suffix))
            self.moved_aside = aside
            self._open()

    def _open(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != _SQLITE_MAGIC:
                    raise StoreCorrupt("not an SQLite database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")  # outside any transaction
        db.execute(f"PRAGMA synchronous={self.sync.upper()}")
        db.execute("PRAGMA wal_autocheckpoint=4000")
        db.execute("PRAGMA journal_size_limit=33554432")
        # KiB. The writer appends whole chunks (mostly overflow pages, written once) and
        # deletes from the other end; the B-tree's few inner pages stay cached. A commit
        # larger than this spills to the WAL before its end, which writes nothing twice but
        # the leaf page. Each KiB here is resident memory (docs/benchmarks.md, issue 15).
        db.execute("PRAGMA cache_size=-256")
        db.execute("PRAGMA secure_delete=OFF")
        self._migrate(db)
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if "epoch" not in meta:
            raise StoreCorrupt("meta table has no epoch")
        self.epoch = int(meta["epoch"])
        floor = int(meta.get("seq_floor", "0"))
        self.drops = json.loads(meta.get("drops", "{}"))
        self.removed_upto: dict[str, int] = {k: int(v) for k, v in json.loads(meta.get("removed_upto", "{}")).items()}
        self._start_clock(int(meta.get("clock_ms", "0")), float(meta.get("clock_wall", "0")))
        high = floor
        for lane in self.lanes.values():
            _create_lane(db, lane.table)
            count, total, newest = db.execute(
                f"SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0), coalesce(max(last_seq), 0) "
                f"FROM {lane.table}"
            ).fetchone()
            lane.count, lane.bytes, lane.newest_seq = count, total, newest
            lane.oldest_ts, lane.oldest_clock = self._oldest(db, lane)
            high = max(high, newest)
        # Lanes that disappeared from the configuration still hold records: keep their
        # highest seq in mind so that numbers never repeat.
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'chunks_%'"
        ).fetchall():
            if name[7:] not in self.lanes:
                (mx,) = db.execute(f"SELECT coalesce(max(last_seq), 0) FROM {name}").fetchone()
                high = max(high, mx)
                log.warning("store holds lane %s that is not configured; its records stay in "
                            "the store until the lane is configured again", name[7:])
        self.next_seq = high + 1
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # KiB: the reader scans chunks once, and each commit of the writer empties its cache
        self._reader.execute("PRAGMA cache_size=-128")

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema {version}, newer than this gateway ({SCHEMA_VERSION})"
            )
        if version < 1:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            epoch = int(time.time() * 1000) * 1000 + random.randrange(1000)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("epoch", str(epoch)), ("seq_floor", "0"), ("drops", "{}"),
                 ("node_id", self.node_id), ("created", str(time.time()))],
            )
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            log.info("created store %s with epoch %d", self.path, epoch)
            return
        if version < 2:
            # 1 -> 2: a row per record becomes chunks of records
            db.execute("BEGIN IMMEDIATE")
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'lane_%'"
            ).fetchall():
                table = f"chunks_{name[5:]}"
                _create_lane(db, table)
                rows = db.execute(f"SELECT seq, ts, topic, payload, pid FROM {name} ORDER BY seq").fetchall()
                for i in range(0, len(rows), CHUNK_RECORDS):
                    _insert_chunk(db, table, rows[i : i + CHUNK_RECORDS], 0)
                db.execute(f"DROP TABLE {name}")
            db.execute("PRAGMA user_version=2")
            db.execute("COMMIT")
            log.info("migrated store %s to schema 2 (chunks)", self.path)
            version = 2
        if version < 3:
            # 2 -> 3: each chunk gets the store clock of its commit (ages without the
            # wall clock); existing chunks get their wall-clock age as it is now
            db.execute("BEGIN IMMEDIATE")
            wall_ms = int(self.clock.wall() * 1000)
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'chunks_%'"
            ).fetchall():
                cols = {r[1] for r in db.execute(f"PRAGMA table_info({name})")}
                if "clock" not in cols:
                    db.execute(f"ALTER TABLE {name} ADD COLUMN clock INTEGER NOT NULL DEFAULT 0")
                db.execute(f"UPDATE {name} SET clock = -max(0, ? - first_ts)", (wall_ms,))
            db.execute("DELETE FROM meta WHERE key IN ('clock_ms', 'clock_wall')")
            db.execute("PRAGMA user_version=3")
            db.execute("COMMIT")
            log.info("migrated store %s to schema 3 (store clock)", self.path)

    # ------------------------------------------------------------ the store clock

    def _start_clock(self, saved_ms: int, saved_wall: float) -> None:
        credit = 0.0
        if saved_wall:
            moved = self.clock.wall() - saved_wall
            if 0 <= moved <= MAX_CREDITED_DOWNTIME:
                credit = moved
            else:
                log.warning("the wall clock moved by %.0f s since this store was last written: "
                            "taken as the clock being set, not as downtime (record ages go on "
                            "from where they were)", moved)
        self._clock_start = saved_ms + int(credit * 1000)
        self._mono0 = self.clock.monotonic()

    def now_clock(self) -> int:
        """The store clock now, in ms (monotonic within a run, continued across runs)."""
        return self._clock_start + int((self.clock.monotonic() - self._mono0) * 1000)

    def age_s(self, lane: str) -> float | None:
        """Age of a lane's oldest record by the store clock (None when empty)."""
        oldest = self.lanes[lane].oldest_clock
        return None if oldest is None else max(0.0, (self.now_clock() - oldest) / 1000)

    def _save_clock(self, db: sqlite3.Connection, force: bool = False) -> None:
        mono = self.clock.monotonic()
        if force or mono - self._clock_saved >= CLOCK_PERSIST_S:
            self._clock_saved = mono
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("clock_ms", str(self.now_clock())), ("clock_wall", repr(self.clock.wall()))])

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._save_clock(self._db, force=True)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                pass
        for conn in (self._reader, self._db):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._db = self._reader = None

    # ------------------------------------------------------------ writing

    @property
    def total_bytes(self) -> int:
        return sum(lane.bytes for lane in self.lanes.values())

    def commit(
        self,
        inserts: list[tuple[str, str, bytes, int, int]],
        deletes: dict[str, int] | None = None,
        drops: dict[str, int] | None = None,
    ) -> CommitResult:
        """In one transaction: insert ``(lane, topic, payload, ts_ms, pid)`` records in
        order, remove delivered records (``deletes``: lane -> highest delivered seq;
        a chunk goes when all its records are delivered), evict the oldest records of
        ``drop_oldest`` lanes while the store is over ``max_bytes``, expire records older
        than their lane's TTL, and add ``drops`` (reason -> count) to the persisted drop
        counters."""
        db = self._db
        if db is None:
            raise StoreError("store is not open")
        res = CommitResult()
        seq = self.next_seq
        res.first_seq = seq
        by_lane: dict[str, list[Record]] = {}
        for lane_name, topic, payload, ts, pid in inserts:
            recs = by_lane.get(lane_name)
            if recs is None:
                recs = by_lane[lane_name] = []
            recs.append((seq, ts, topic, payload, pid))
            seq += 1
        res.last_seq = seq - 1
        res.inserted = by_lane
        floor_changed = False
        removed = dict(self.removed_upto)
        clock = self.now_clock()
        try:
            db.execute("BEGIN IMMEDIATE")
            # the lanes' counters change only after COMMIT, all at once, so that a status
            # read meanwhile sees one consistent state: count and bytes deltas here
            dcount = {name: 0 for name in self.lanes}
            dbytes = {name: 0 for name in self.lanes}
            oldest = {name: lane.oldest_clock for name, lane in self.lanes.items()}
            for lane_name, recs in by_lane.items():
                lane = self.lanes[lane_name]
                # a chunk takes records while it holds fewer than CHUNK_RECORDS and fewer
                # than CHUNK_BYTES (the record that reaches it is the chunk's last);
                # cum[i]: the bytes of records 0..i
                cum = list(accumulate(map(add, map(add, map(len, map(_TOPIC, recs)),
                                                   map(len, map(_PAYLOAD, recs))),
                                          repeat(RECORD_OVERHEAD)), initial=0))
                start = 0
                while start < len(recs):
                    end = min(bisect_left(cum, cum[start] + CHUNK_BYTES, start + 1), len(recs),
                              start + CHUNK_RECORDS)
                    size = cum[end] - cum[start]
                    _insert_chunk(db, lane.table, recs[start:end], clock, size)
                    dcount[lane_name] += end - start
                    dbytes[lane_name] += size
                    start = end
                if oldest[lane_name] is None:
                    oldest[lane_name] = clock
            for lane_name, upto in (deletes or {}).items():
                n, b, hi = self._remove_delivered(db, self.lanes[lane_name], upto)
                if hi > removed.get(lane_name, 0):
                    removed[lane_name] = hi
                if n:
                    res.deleted[lane_name] = (n, b)
                    dcount[lane_name] -= n
                    dbytes[lane_name] -= b
                    floor_changed = True
            mono = self.clock.monotonic()
            if self._last_ttl is None or mono - self._last_ttl >= 1.0:
                self._last_ttl = mono
                for lane in self.lanes.values():
                    first_clock = oldest[lane.spec.name]
                    if lane.spec.ttl and first_clock is not None:
                        cutoff = clock - int(lane.spec.ttl * 1000)
                        if first_clock <= cutoff:
                            n, b = self._expire_front(db, lane, cutoff,
                                                      res.expired_seqs.setdefault(lane.spec.name, []))
                            if n:
                                res.expired[lane.spec.name] = (n, b)
                                dcount[lane.spec.name] -= n
                                dbytes[lane.spec.name] -= b
                                floor_changed = True
            over = self.total_bytes + sum(dbytes.values()) - self.max_bytes
            if over > 0:
                for lane in reversed(list(self.lanes.values())):
                    if lane.spec.when_full != "drop_oldest" or over <= 0:
                        continue
                    freed = [0]

                    def enough(r: Record, freed: list[int] = freed, need: int = over) -> bool:
                        if freed[0] >= need:
                            return False
                        freed[0] += len(r[2]) + len(r[3]) + RECORD_OVERHEAD
                        return True

                    n, b = self._drop_front(db, lane, enough,
                                            res.evicted_seqs.setdefault(lane.spec.name, []))
                    if n:
                        res.evicted[lane.spec.name] = (n, b)
                        dcount[lane.spec.name] -= n
                        dbytes[lane.spec.name] -= b
                        floor_changed = True
                        over -= b
            counted = dict(drops or {})
            for name, (n, _) in res.evicted.items():
                counted[f"store_full:{name}"] = counted.get(f"store_full:{name}", 0) + n
            for name, (n, _) in res.expired.items():
                counted[f"ttl:{name}"] = counted.get(f"ttl:{name}", 0) + n
            new_drops = dict(self.drops)
            if counted:
                for k, v in counted.items():
                    new_drops[k] = new_drops.get(k, 0) + v
                db.execute("UPDATE meta SET value=? WHERE key='drops'", (json.dumps(new_drops),))
            if floor_changed:
                db.execute("UPDATE meta SET value=? WHERE key='seq_floor'", (str(seq - 1),))
            for part in (res.evicted_seqs, res.expired_seqs):
                for lane_name, seqs in part.items():
                    if seqs and seqs[-1] > removed.get(lane_name, 0):
                        removed[lane_name] = seqs[-1]
            if removed != self.removed_upto:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('removed_upto', ?)", (json.dumps(removed),))
            self._save_clock(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._reload_counts()
            raise
        # only after COMMIT: the uplink reads up to newest_seq through another connection,
        # and status reads the counters and drops
        for name, lane in self.lanes.items():
            lane.count += dcount[name]
            lane.bytes += dbytes[name]
            if name in by_lane or dcount[name] < 0:
                lane.oldest_ts, lane.oldest_clock = self._oldest(db, lane)
        self.drops = new_drops
        self.removed_upto = removed
        for lane_name, recs in by_lane.items():
            self.lanes[lane_name].newest_seq = recs[-1][0]
        self.next_seq = seq
        return res

    def _remove_delivered(self, db: sqlite3.Connection, lane: LaneState, upto: int) -> tuple[int, int, int]:
        """Remove the chunks all of whose records are delivered; (records, bytes, highest seq)."""
        n, b, hi = db.execute(
            f"SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0), coalesce(max(last_seq), 0) "
            f"FROM {lane.table} WHERE last_seq <= ?",
            (upto,),
        ).fetchone()
        if n:
            db.execute(f"DELETE FROM {lane.table} WHERE last_seq <= ?", (upto,))
        return n, b, hi

    def _drop_front(self, db: sqlite3.Connection, lane: LaneState, drop: object,
                    seqs: list[int]) -> tuple[int, int]:
        """Remove the oldest records of a lane while ``drop(record)`` says so: whole chunks
        go, the chunk where it stops is cut and rewritten. The removed seqs go to ``seqs``."""
        n = b = 0
        while True:
            row = db.execute(
                f"SELECT first_seq, n, bytes, data, clock FROM {lane.table} ORDER BY first_seq LIMIT 1"
            ).fetchone()
            if row is None:
                break
            first, cn, cb, data, chunk_clock = row
            recs = unpack(first, data)
            k = 0
            while k < len(recs) and drop(recs[k]):  # type: ignore[operator]
                k += 1
            if k == 0:
                break
            seqs.extend(r[0] for r in recs[:k])
            db.execute(f"DELETE FROM {lane.table} WHERE first_seq = ?", (first,))
            if k == len(recs):
                n, b = n + cn, b + cb
                continue
            rest = recs[k:]
            kept = sum(record_size(r[2], r[3]) for r in rest)
            _insert_chunk(db, lane.table, [(r[0], r[1], r[2], r[3], r[4]) for r in rest], chunk_clock)
            n, b = n + k, b + cb - kept
            break
        return n, b

    def _expire_front(self, db: sqlite3.Connection, lane: LaneState, cutoff: int,
                      seqs: list[int]) -> tuple[int, int]:
        """Remove the lane's oldest chunks committed at or before ``cutoff`` (store clock;
        chunks are in commit order, so those are a prefix). The removed seqs go to
        ``seqs``."""
        n = b = 0
        while True:
            row = db.execute(
                f"SELECT first_seq, n, bytes, data, clock FROM {lane.table} ORDER BY first_seq LIMIT 1"
            ).fetchone()
            if row is None or row[4] > cutoff:
                break
            first, cn, cb, data, _ = row
            seqs.extend(r[0] for r in unpack(first, data))
            db.execute(f"DELETE FROM {lane.table} WHERE first_seq = ?", (first,))
            n, b = n + cn, b + cb
        return n, b

    @staticmethod
    def _oldest(db: sqlite3.Connection, lane: LaneState) -> tuple[int | None, int | None]:
        row = db.execute(f"SELECT first_ts, clock FROM {lane.table} ORDER BY first_seq LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (None, None)

    def _reload_counts(self) -> None:
        db = self._db
        if db is None:
            return
        for lane in self.lanes.values():
            lane.count, lane.bytes = db.execute(
                f"SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0) FROM {lane.table}"
            ).fetchone()
            lane.oldest_ts, lane.oldest_clock = self._oldest(db, lane)

    # ------------------------------------------------------------ reading

    def read(
        self, lane_name: str, after_seq: int, max_records: int, max_bytes: int
    ) -> list[Record]:
        """Records of one lane with seq > after_seq, oldest first: (seq, ts, topic, payload, pid),
        at most ``max_records`` and ``max_bytes`` (but at least one). Uses the reader
        connection; call it from one thread only."""
        conn = self._reader
        if conn is None:
            raise StoreError("store is not open")
        table = f"chunks_{lane_name}"
        cur = conn.execute(
            f"SELECT first_seq, data FROM {table} WHERE first_seq >= coalesce("
            f"(SELECT max(first_seq) FROM {table} WHERE first_seq <= ?), 0) ORDER BY first_seq",
            (after_seq,),
        )
        out: list[Record] = []
        total = 0
        try:
            for first, data in cur:
                for r in unpack(first, data, after_seq, max_records - len(out)):
                    total += len(r[2]) + len(r[3]) + RECORD_OVERHEAD
                    if out and (total > max_bytes or len(out) >= max_records):
                        return out
                    out.append(r)
                if len(out) >= max_records:
                    return out
        finally:
            cur.close()
        return out

    def recent_hashes(self, limit: int) -> dict[int, int]:
        """``{packet id: hash((topic, payload))}`` of the newest ``limit`` records of each
        lane (older first, so a newer record wins a reused packet id)."""
        db = self._db
        if db is None:
            raise StoreError("store is not open")
        picked: list[tuple[int, int, int]] = []
        for lane in self.lanes.values():
            got = 0
            for first, data in db.execute(
                f"SELECT first_seq, data FROM {lane.table} ORDER BY first_seq DESC"
            ):
                recs = unpack(first, data)
                picked.extend((r[0], r[4], hash((r[2], r[3]))) for r in recs if r[4])
                got += len(recs)
                if got >= limit:
                    break
        picked.sort()
        return {pid: h for _, pid, h in picked[-limit:]}


def _create_lane(db: sqlite3.Connection, table: str) -> None:
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
        " n INTEGER NOT NULL, bytes INTEGER NOT NULL, first_ts INTEGER NOT NULL,"
        " last_ts INTEGER NOT NULL, data BLOB NOT NULL, clock INTEGER NOT NULL DEFAULT 0)"
    )


def _insert_chunk(db: sqlite3.Connection, table: str, recs: list[Record], clock: int,
                  size: int | None = None) -> None:
    """One chunk (``size``: its records' bytes, if known); ``clock`` is the store clock of
    its commit (ages and TTLs)."""
    if size is None:
        size = sum(record_size(r[2], r[3]) for r in recs)
    db.execute(
        f"INSERT INTO {table} (first_seq, last_seq, n, bytes, first_ts, last_ts, data, clock) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (recs[0][0], recs[-1][0], len(recs), size, recs[0][1], recs[-1][1], pack(recs), clock),
    )


def inspect(path: str | Path) -> dict[str, Any]:
    """Read a store file without changing it (for ``edgeferry gateway status``)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no store at {p}")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        clock_ms = int(meta.get("clock_ms", "0"))  # the store clock when last written
        lanes = {}
        for (table,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'chunks_%' ORDER BY name"
        ).fetchall():
            count, total = conn.execute(
                f"SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0) FROM {table}").fetchone()
            cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            row = conn.execute(f"SELECT {'clock' if 'clock' in cols else 'first_ts'} FROM {table} "
                               "ORDER BY first_seq LIMIT 1").fetchone() if "clock" in cols else None
            lanes[table[7:]] = {
                "records": count,
                "bytes": total,
                # as of the last write (the gateway is not running)
                "oldest_age_s": round(max(0, clock_ms - row[0]) / 1000, 3) if row else None,
            }
        conn.close()
    except sqlite3.DatabaseError as e:
        raise StoreCorrupt(f"{p} is not a readable store: {e}") from None
    return {
        "store": str(p),
        "epoch": int(meta.get("epoch", 0)),
        "node_id": meta.get("node_id", ""),
        "lanes": lanes,
        "drops": json.loads(meta.get("drops", "{}")),
        "file_bytes": p.stat().st_size,
    }
