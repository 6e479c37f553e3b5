"""The gateway's downlink store: commands it holds and the desired/reported state of its
things, in a SQLite file beside the uplink store (``<store>.downlink``).

A separate file, so that the uplink's store (its chunks, epochs and migrations) stays
as it is; the same rules: WAL, ``synchronous=FULL`` (a command acknowledged to the cloud
survives power loss), numbered migrations in ``user_version``, one transaction per
group of changes. Blocking: the downlink calls it from one thread.

A held command keeps its time to live as ``remaining_ms`` as of a save, with the
monotonic time, wall time and boot id of that save (:class:`edge.downlink.Held`).
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.downlink import FINAL, RANK, Clock, Held, delta
from gateway.errors import StoreError

__all__ = ["DownStore", "HeldCommand", "Thing", "downlink_path"]

KEEP_FINAL = 7 * 86400.0
"""Seconds a finished command's id is kept (a late re-offer is recognised, not run)."""

MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value);
    CREATE TABLE commands (
        id TEXT PRIMARY KEY, target TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL,
        remaining_ms INTEGER, saved_mono REAL NOT NULL, saved_wall REAL NOT NULL, boot TEXT NOT NULL,
        state TEXT NOT NULL, sent_rank INTEGER NOT NULL DEFAULT -1, error TEXT,
        received REAL NOT NULL, finished REAL);
    CREATE INDEX commands_open ON commands (state);
    CREATE TABLE things (
        thing TEXT PRIMARY KEY, desired TEXT, desired_version INTEGER NOT NULL DEFAULT 0,
        reported TEXT, reported_version INTEGER NOT NULL DEFAULT 0,
        desired_published INTEGER NOT NULL DEFAULT 1, report_sent INTEGER NOT NULL DEFAULT 1)
        WITHOUT ROWID;
    """,
]


def downlink_path(store: str | Path) -> Path:
    p = Path(store)
    return p.with_name(p.name + ".downlink")


@dataclass(slots=True)
class HeldCommand:
    id: str
    target: str
    name: str
    args: Any
    held: Held
    state: str  # held (not yet published locally), published, accepted, or a final status
    sent_rank: int  # the highest status this gateway published about it (-1: none)
    error: str | None


@dataclass(slots=True)
class Thing:
    thing: str
    desired: Any
    desired_version: int
    reported: Any
    reported_version: int
    desired_published: bool
    report_sent: bool

    @property
    def delta(self) -> dict[str, Any]:
        return delta(self.desired, self.reported)


class DownStore:
    def __init__(self, path: str | Path, clock: Clock, sync: str = "full") -> None:
        self.path = Path(path)
        self.clock = clock
        self.sync = sync
        self.epoch = 0
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            have = db.execute("PRAGMA user_version").fetchone()[0]
            if have > len(MIGRATIONS):
                raise StoreError(f"{self.path}: downlink schema {have} is newer than this edgeferry")
            if have < len(MIGRATIONS):
                db.execute("BEGIN IMMEDIATE")
                for n in range(have, len(MIGRATIONS)):
                    for stmt in MIGRATIONS[n].split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                if have == 0:
                    epoch = int(time.time() * 1000) * 1000 + random.randrange(1000)
                    db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
                db.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
                db.execute("COMMIT")
            self.epoch = int(db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the downlink store {self.path}: {e}") from None
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the downlink store is not open")
        return self._db

    def _tx(self, fn: Any, *args: Any) -> Any:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db, *args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    # ------------------------------------------------------------ from the cloud

    def receive(self, commands: list[dict[str, Any]], desired: list[dict[str, Any]]) -> tuple[int, int]:
        """Store received commands (new ids only) and desired documents (newer versions
        only) in one transaction; (new commands, desired documents applied)."""
        clock = self.clock

        def tx(db: sqlite3.Connection) -> tuple[int, int]:
            new = applied = 0
            now = clock.wall()
            for c in commands:
                ttl = c.get("ttl_ms")
                h = Held.start(None if ttl is None else int(ttl), clock)
                state, err = "held", None
                if h.remaining_ms is not None and h.remaining_ms <= 0:
                    state, err = "expired", "time to live ran out before the gateway took it"
                cur = db.execute(
                    "INSERT OR IGNORE INTO commands (id, target, name, args, remaining_ms, saved_mono,"
                    " saved_wall, boot, state, error, received) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (c["id"], c["target"], c["name"], json.dumps(c.get("args", {})), h.remaining_ms,
                     h.saved_mono, h.saved_wall, h.boot, state, err, now))
                new += cur.rowcount
            for d in desired:
                row = db.execute("SELECT desired_version FROM things WHERE thing=?", (d["thing"],)).fetchone()
                if row is not None and row[0] >= d["version"]:
                    continue  # stale or already held: dropped, never merged
                db.execute(
                    "INSERT INTO things (thing, desired, desired_version, desired_published)"
                    " VALUES (?,?,?,0) ON CONFLICT (thing) DO UPDATE SET desired=excluded.desired,"
                    " desired_version=excluded.desired_version, desired_published=0",
                    (d["thing"], json.dumps(d["desired"]), d["version"]))
                applied += 1
            return new, applied

        out: tuple[int, int] = self._tx(tx)
        return out

    def hello(self) -> dict[str, Any]:
        """What the gateway holds, for its hello: command ids and desired versions."""
        db = self.db
        ids = [r[0] for r in db.execute("SELECT id FROM commands")]
        versions = dict(db.execute("SELECT thing, desired_version FROM things WHERE desired_version > 0"))
        return {"cmds": ids, "shadow": versions}

    # ------------------------------------------------------------ commands

    def open_commands(self) -> list[HeldCommand]:
        """Commands not final, and final ones whose status was not published yet."""
        rows = self.db.execute(
            "SELECT id, target, name, args, remaining_ms, saved_mono, saved_wall, boot, state,"
            " sent_rank, error FROM commands WHERE state IN ('held','published','accepted')"
            " OR sent_rank < 3 ORDER BY id")
        return [HeldCommand(r[0], r[1], r[2], json.loads(r[3]), Held(r[4], r[5], r[6], r[7]),
                            r[8], r[9], r[10]) for r in rows]

    def rebase(self) -> int:
        """At start: re-save every open command's TTL on this boot (or expire it); the
        number expired."""
        clock = self.clock

        def tx(db: sqlite3.Connection) -> int:
            expired = 0
            for c in self.open_commands():
                if c.state in FINAL:
                    continue
                left, why = c.held.remaining(clock)
                if left <= 0:
                    db.execute("UPDATE commands SET state='expired', error=?, finished=? WHERE id=?",
                               (why, clock.wall(), c.id))
                    expired += 1
                else:
                    h = c.held.resave(clock)
                    db.execute("UPDATE commands SET remaining_ms=?, saved_mono=?, saved_wall=?, boot=?"
                               " WHERE id=?", (h.remaining_ms, h.saved_mono, h.saved_wall, h.boot, c.id))
            return expired

        n: int = self._tx(tx)
        return n

    def update(self, changes: list[tuple[str, str | None, int | None, str | None]]) -> None:
        """Apply (id, new state or None, sent rank or None, error) in one transaction.
        A state only moves forward; a final state stays."""

        def tx(db: sqlite3.Connection) -> None:
            now = self.clock.wall()
            for cid, state, sent, err in changes:
                if state is not None:
                    row = db.execute("SELECT state FROM commands WHERE id=?", (cid,)).fetchone()
                    if row is None:
                        continue
                    cur = row[0]
                    if cur in FINAL or _rank(state) < _rank(cur):
                        pass
                    else:
                        db.execute("UPDATE commands SET state=?, error=coalesce(?, error),"
                                   " finished=CASE WHEN ? THEN ? ELSE finished END WHERE id=?",
                                   (state, err, state in FINAL, now, cid))
                if sent is not None:
                    db.execute("UPDATE commands SET sent_rank=max(sent_rank, ?) WHERE id=?", (sent, cid))
            db.execute("DELETE FROM commands WHERE finished IS NOT NULL AND finished < ? AND sent_rank >= 3",
                       (now - KEEP_FINAL,))

        self._tx(tx)

    def command_state(self, cid: str) -> str | None:
        row = self.db.execute("SELECT state FROM commands WHERE id=?", (cid,)).fetchone()
        return None if row is None else str(row[0])

    # ------------------------------------------------------------ things

    def things(self, only_pending: bool = False) -> list[Thing]:
        q = ("SELECT thing, desired, desired_version, reported, reported_version, desired_published,"
             " report_sent FROM things")
        if only_pending:
            q += " WHERE desired_published=0 OR report_sent=0"
        return [Thing(r[0], None if r[1] is None else json.loads(r[1]), r[2],
                      None if r[3] is None else json.loads(r[3]), r[4], bool(r[5]), bool(r[6]))
                for r in self.db.execute(q + " ORDER BY thing")]

    def report(self, thing: str, doc: dict[str, Any]) -> int | None:
        """Store a reported document; its new version (None: the same as held)."""

        def tx(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT reported, reported_version FROM things WHERE thing=?", (thing,)).fetchone()
            if row is not None and row[0] is not None and json.loads(row[0]) == doc:
                return None
            version = (row[1] if row else 0) + 1
            db.execute(
                "INSERT INTO things (thing, reported, reported_version, report_sent)"
                " VALUES (?,?,?,0) ON CONFLICT (thing) DO UPDATE SET reported=excluded.reported,"
                " reported_version=excluded.reported_version, report_sent=0",
                (thing, json.dumps(doc), version))
            return version

        out: int | None = self._tx(tx)
        return out

    def mark_things(self, published: list[tuple[str, int]], reported: list[tuple[str, int]]) -> None:
        """Mark desired (thing, version) published locally and reports (thing, version) sent."""

        def tx(db: sqlite3.Connection) -> None:
            for thing, v in published:
                db.execute("UPDATE things SET desired_published=1 WHERE thing=? AND desired_version=?", (thing, v))
            for thing, v in reported:
                db.execute("UPDATE things SET report_sent=1 WHERE thing=? AND reported_version=?", (thing, v))

        self._tx(tx)


def _rank(state: str) -> int:
    return {"held": 0, "published": 1}.get(state, RANK.get(state, 0) if state != "delivered" else 1)

