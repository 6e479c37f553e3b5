"""The gateway's SQLite store: a bounded, crash-safe backlog, one table per lane.

Every record gets the node's next sequence number. Numbers never repeat: the store keeps
``seq_floor`` (the highest number it ever removed) in its meta table, and the next number
is one above the larger of that and the highest number still stored. A new store file
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

All methods are blocking; the gateway calls them from one writer thread and one reader
thread (each with its own connection), never from the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import StoreCorrupt, StoreError

__all__ = ["RECORD_OVERHEAD", "LaneSpec", "LaneState", "Store", "CommitResult", "record_size"]

log = logging.getLogger("edgeferry.store")

RECORD_OVERHEAD = 24
"""Bytes counted per record on top of its topic and payload (row header, seq, ts)."""

SCHEMA_VERSION = 1
_LANE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SQLITE_MAGIC = b"SQLite format 3\x00"


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
    oldest_ts: int | None = None  # ms
    newest_seq: int = 0

    @property
    def table(self) -> str:
        return f"lane_{self.spec.name}"


@dataclass(slots=True)
class CommitResult:
    """What one commit did: the seq range it gave out and what it removed, per lane."""

    first_seq: int = 0
    last_seq: int = 0
    deleted: dict[str, tuple[int, int]] = field(default_factory=dict)  # delivered
    evicted: dict[str, tuple[int, int]] = field(default_factory=dict)  # store full
    expired: dict[str, tuple[int, int]] = field(default_factory=dict)  # ttl


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
        self._last_ttl = 0.0

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
        db.execute("PRAGMA wal_autocheckpoint=2000")
        db.execute("PRAGMA journal_size_limit=33554432")
        db.execute("PRAGMA cache_size=-2000")
        self._migrate(db)
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if "epoch" not in meta:
            raise StoreCorrupt("meta table has no epoch")
        self.epoch = int(meta["epoch"])
        floor = int(meta.get("seq_floor", "0"))
        self.drops = json.loads(meta.get("drops", "{}"))
        high = floor
        for lane in self.lanes.values():
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {lane.table} (seq INTEGER PRIMARY KEY,"
                " ts INTEGER NOT NULL, pid INTEGER NOT NULL, sz INTEGER NOT NULL,"
                " topic TEXT NOT NULL, payload BLOB NOT NULL)"
            )
            count, total, newest = db.execute(
                f"SELECT count(*), coalesce(sum(sz), 0), coalesce(max(seq), 0) FROM {lane.table}"
            ).fetchone()
            lane.count, lane.bytes, lane.newest_seq = count, total, newest
            row = db.execute(f"SELECT ts FROM {lane.table} ORDER BY seq LIMIT 1").fetchone()
            lane.oldest_ts = row[0] if row else None
            high = max(high, newest)
        # Lanes that disappeared from the configuration still hold records: keep their
        # highest seq in mind so that numbers never repeat.
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'lane_%'"
        ).fetchall():
            if name[5:] not in self.lanes:
                (mx,) = db.execute(f"SELECT coalesce(max(seq), 0) FROM {name}").fetchone()
                high = max(high, mx)
                log.warning("store holds lane table %s that is not configured; its records "
                            "stay in the store until the lane is configured again", name)
        self.next_seq = high + 1
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA cache_size=-1000")

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

    def close(self) -> None:
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
        order, remove delivered records (``deletes``: lane -> highest delivered seq),
        evict the oldest records of ``drop_oldest`` lanes while the store is over
        ``max_bytes``, expire records older than their lane's TTL, and add ``drops``
        (reason -> count) to the persisted drop counters."""
        db = self._db
        if db is None:
            raise StoreError("store is not open")
        res = CommitResult()
        seq = self.next_seq
        res.first_seq = seq
        by_lane: dict[str, list[tuple[int, int, int, int, str, bytes]]] = {}
        for lane_name, topic, payload, ts, pid in inserts:
            rows = by_lane.get(lane_name)
            if rows is None:
                rows = by_lane[lane_name] = []
            rows.append((seq, ts, pid, len(topic) + len(payload) + RECORD_OVERHEAD, topic, payload))
            seq += 1
        res.last_seq = seq - 1
        floor_changed = False
        try:
            db.execute("BEGIN IMMEDIATE")
            for lane_name, rows in by_lane.items():
                lane = self.lanes[lane_name]
                db.executemany(f"INSERT INTO {lane.table} VALUES (?,?,?,?,?,?)", rows)
                # counted now (eviction below needs it); newest_seq only after COMMIT,
                # because the uplink reads up to it through another connection
                lane.count += len(rows)
                lane.bytes += sum(r[3] for r in rows)
                if lane.oldest_ts is None:
                    lane.oldest_ts = rows[0][1]
            for lane_name, upto in (deletes or {}).items():
                lane = self.lanes[lane_name]
                n, b = self._remove_upto(db, lane, upto)
                if n:
                    res.deleted[lane_name] = (n, b)
                    floor_changed = True
            now = time.time()
            if now - self._last_ttl >= 1.0:
                self._last_ttl = now
                for lane in self.lanes.values():
                    if lane.spec.ttl and lane.oldest_ts is not None:
                        cutoff = int((now - lane.spec.ttl) * 1000)
                        if lane.oldest_ts < cutoff:
                            n, b = self._remove_older(db, lane, cutoff)
                            if n:
                                res.expired[lane.spec.name] = (n, b)
                                floor_changed = True
            over = self.total_bytes - self.max_bytes
            if over > 0:
                for lane in reversed(list(self.lanes.values())):
                    if lane.spec.when_full != "drop_oldest" or over <= 0:
                        continue
                    n, b = self._evict(db, lane, over)
                    if n:
                        res.evicted[lane.spec.name] = (n, b)
                        floor_changed = True
                        over -= b
            counted = dict(drops or {})
            for name, (n, _) in res.evicted.items():
                counted[f"store_full:{name}"] = counted.get(f"store_full:{name}", 0) + n
            for name, (n, _) in res.expired.items():
                counted[f"ttl:{name}"] = counted.get(f"ttl:{name}", 0) + n
            if counted:
                for k, v in counted.items():
                    self.drops[k] = self.drops.get(k, 0) + v
                db.execute("UPDATE meta SET value=? WHERE key='drops'", (json.dumps(self.drops),))
            if floor_changed:
                db.execute("UPDATE meta SET value=? WHERE key='seq_floor'", (str(seq - 1),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._reload_counts()
            raise
        for lane_name, rows in by_lane.items():
            self.lanes[lane_name].newest_seq = rows[-1][0]
        self.next_seq = seq
        return res

    def _remove_upto(self, db: sqlite3.Connection, lane: LaneState, upto: int) -> tuple[int, int]:
        n, b = db.execute(
            f"SELECT count(*), coalesce(sum(sz), 0) FROM {lane.table} WHERE seq <= ?", (upto,)
        ).fetchone()
        if n:
            db.execute(f"DELETE FROM {lane.table} WHERE seq <= ?", (upto,))
            self._after_remove(db, lane, n, b)
        return n, b

    def _remove_older(self, db: sqlite3.Connection, lane: LaneState, cutoff_ms: int) -> tuple[int, int]:
        # ts grows with seq, so scan from the oldest and stop at the first young record
        last = None
        n = b = 0
        cur = db.execute(f"SELECT seq, ts, sz FROM {lane.table} ORDER BY seq")
        for seq, ts, sz in cur:
            if ts >= cutoff_ms:
                break
            last, n, b = seq, n + 1, b + sz
        cur.close()
        if last is not None:
            db.execute(f"DELETE FROM {lane.table} WHERE seq <= ?", (last,))
            self._after_remove(db, lane, n, b)
        return n, b

    def _evict(self, db: sqlite3.Connection, lane: LaneState, need: int) -> tuple[int, int]:
        last = None
        n = b = 0
        cur = db.execute(f"SELECT seq, sz FROM {lane.table} ORDER BY seq")
        for seq, sz in cur:
            if b >= need:
                break
            last, n, b = seq, n + 1, b + sz
        cur.close()
        if last is not None:
            db.execute(f"DELETE FROM {lane.table} WHERE seq <= ?", (last,))
            self._after_remove(db, lane, n, b)
        return n, b

    def _after_remove(self, db: sqlite3.Connection, lane: LaneState, n: int, b: int) -> None:
        lane.count -= n
        lane.bytes -= b
        row = db.execute(f"SELECT ts FROM {lane.table} ORDER BY seq LIMIT 1").fetchone()
        lane.oldest_ts = row[0] if row else None

    def _reload_counts(self) -> None:
        db = self._db
        if db is None:
            return
        for lane in self.lanes.values():
            lane.count, lane.bytes = db.execute(
                f"SELECT count(*), coalesce(sum(sz), 0) FROM {lane.table}"
            ).fetchone()
            row = db.execute(f"SELECT ts FROM {lane.table} ORDER BY seq LIMIT 1").fetchone()
            lane.oldest_ts = row[0] if row else None

    # ------------------------------------------------------------ reading

    def read(
        self, lane_name: str, after_seq: int, max_records: int, max_bytes: int
    ) -> list[tuple[int, int, str, bytes]]:
        """Records of one lane with seq > after_seq, oldest first: (seq, ts, topic, payload).
        Uses the reader connection; call it from one thread only."""
        conn = self._reader
        if conn is None:
            raise StoreError("store is not open")
        rows = conn.execute(
            f"SELECT seq, ts, topic, payload, sz FROM lane_{lane_name} WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, max_records),
        ).fetchall()
        total = 0
        for i, row in enumerate(rows):
            total += row[4]
            if total > max_bytes and i:
                rows = rows[:i]
                break
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def recent(self, limit: int) -> list[tuple[int, int, str, bytes]]:
        """The newest ``limit`` records over all lanes: (seq, pid, topic, payload). Used
        after a restart to recognise messages the broker redelivers because it never got
        our acknowledgement."""
        db = self._db
        if db is None:
            raise StoreError("store is not open")
        out: list[tuple[int, int, str, bytes]] = []
        for lane in self.lanes.values():
            out.extend(db.execute(
                f"SELECT seq, pid, topic, payload FROM {lane.table} ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall())
        out.sort()
        return out[-limit:]


def inspect(path: str | Path) -> dict[str, object]:
    """Read a store file without changing it (for ``edgeferry gateway status``)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no store at {p}")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        now_ms = int(time.time() * 1000)
        lanes = {}
        for (table,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'lane_%' ORDER BY name"
        ).fetchall():
            count, total = conn.execute(f"SELECT count(*), coalesce(sum(sz),0) FROM {table}").fetchone()
            row = conn.execute(f"SELECT ts FROM {table} ORDER BY seq LIMIT 1").fetchone()
            lanes[table[5:]] = {
                "records": count,
                "bytes": total,
                "oldest_age_s": round((now_ms - row[0]) / 1000, 3) if row else None,
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
