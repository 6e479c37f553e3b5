"""The cloud side's record of commands and shadows, in the database ingest writes.

For a ``sqlite:PATH`` sink the tables live in PATH itself; for a ``jsonl:PATH`` sink in
``PATH.state.db`` beside it; for a ``postgresql://`` sink in its database
(gateway/pgstate.py runs these methods there). The CLI (``cmd send``, ``shadow set``) and ingest's sync
open the same file (WAL, a busy timeout), so status survives restarts of everything.
docs/commands.md and docs/shadow.md give the rules this module enforces:

* a command's state only moves forward; a final state is kept, except a cloud-side
  ``expired`` that gives way to the site's verdict;
* a status is applied only if it comes from the node the command was sent to;
* desired versions grow by one per accepted ``set``; a ``set`` that names a version
  other than the one held is refused (:class:`VersionConflict`);
* a reported document older than (or as old as) the one held is dropped.

Schema changes are numbered migrations (``MIGRATIONS``), their number kept in the
``cloudstate_meta`` table (the sink's own table does not use ``user_version``, and this
module stays out of it).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from edge.downlink import FINAL, RANK
from edge.events import new_id
from gateway.errors import GatewayError, SinkError
from gateway.migrations import migrate

__all__ = ["CloudState", "VersionConflict", "state_path", "MAX_DOC_BYTES", "MAX_TTL", "DEFAULT_TTL"]

MAX_DOC_BYTES = 64 * 1024
DEFAULT_TTL = 86400.0
MAX_TTL = 30 * 86400.0

MIGRATIONS = [
    # 1: commands and shadows
    """
    CREATE TABLE IF NOT EXISTS commands (
        id TEXT PRIMARY KEY, node TEXT NOT NULL, target TEXT NOT NULL, name TEXT NOT NULL,
        args TEXT NOT NULL, ttl_ms INTEGER, created REAL NOT NULL,
        state TEXT NOT NULL, by TEXT, reply TEXT, error TEXT,
        delivered_at REAL, accepted_at REAL, finished_at REAL, site_time REAL,
        offers INTEGER NOT NULL DEFAULT 0, last_offer REAL);
    CREATE INDEX IF NOT EXISTS commands_node_state ON commands (node, state);
    CREATE TABLE IF NOT EXISTS shadows (
        node TEXT NOT NULL, thing TEXT NOT NULL,
        desired TEXT, desired_version INTEGER NOT NULL DEFAULT 0, desired_at REAL,
        reported TEXT, reported_epoch INTEGER NOT NULL DEFAULT 0,
        reported_version INTEGER NOT NULL DEFAULT 0, reported_at REAL,
        stale_dropped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node, thing)) WITHOUT ROWID;
    """,
]


class VersionConflict(GatewayError, ValueError):
    """A ``shadow set`` named a version other than the one held (AWS: 409)."""

    def __init__(self, held: int, given: int) -> None:
        super().__init__(f"version conflict: the desired version held is {held}, not {given}")
        self.held = held


def state_path(sink: str) -> Path:
    """The database file of a sink spec (``sqlite:PATH`` or ``jsonl:PATH``)."""
    kind, _, path = sink.partition(":")
    if kind == "sqlite" and path:
        return Path(path)
    if kind == "jsonl" and path:
        return Path(path + ".state.db")
    raise SinkError(f"sink {sink!r}: expected jsonl:PATH or sqlite:PATH")


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


class CloudState:
    """One connection to the cloud database. Blocking; one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
            self._migrate()
        except sqlite3.Error as e:
            raise SinkError(f"cannot open the cloud state in {self.path}: {e}") from None

    @classmethod
    def for_sink(cls, sink: str) -> CloudState:
        """The cloud state of a sink spec: beside a JSONL or SQLite sink, or in the
        PostgreSQL sink's database (gateway/pgstate.py)."""
        return cls.open(sink if sink.startswith(("postgresql://", "postgres://")) else str(state_path(sink)))

    @classmethod
    def open(cls, where: str) -> CloudState:
        """A database file's path, or a ``postgresql://`` URL."""
        if where.startswith(("postgresql://", "postgres://")):
            from gateway.pgstate import PgConn  # the driver only for such a sink

            st = cls.__new__(cls)
            conn = PgConn(where)
            st.path, st._db = Path(conn.label), conn  # type: ignore[assignment]
            return st
        return cls(where)

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        migrate(self._db.execute, MIGRATIONS, str(self.path))

    # ------------------------------------------------------------ commands

    def add_command(self, node: str, target: str, name: str, args: Any, ttl: float | None,
                    now: float | None = None) -> str:
        """Queue a command; its id (sortable)."""
        cid = new_id()
        ttl_ms = None if ttl is None else int(ttl * 1000)
        self._db.execute(
            "INSERT INTO commands (id, node, target, name, args, ttl_ms, created, state)"
            " VALUES (?,?,?,?,?,?,?, 'queued')",
            (cid, node, target, name, json.dumps(args), ttl_ms, time.time() if now is None else now))
        return cid

    def offer(self, cid: str, now: float | None = None) -> dict[str, Any] | None:
        """The wire form of a queued command (``ttl_ms`` remaining now), or None when it is
        no longer queued or just expired (then marked so)."""
        out = self.offers_for(None, set(), now, only=cid)
        return out[0] if out else None

    def offers_for(self, node: str | None, have: set[str], now: float | None = None,
                   only: str | None = None, older_than: float | None = None) -> list[dict[str, Any]]:
        """Commands of ``node`` to offer: queued ones, oldest first, with their remaining TTL.
        Those the gateway says it holds (``have``) are marked delivered instead; those
        whose TTL ran out are marked expired."""
        now = time.time() if now is None else now
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if only is not None:
                rows = db.execute("SELECT id, node, target, name, args, ttl_ms, created FROM commands"
                                  " WHERE id=? AND state='queued'", (only,)).fetchall()
            else:
                q = ("SELECT id, node, target, name, args, ttl_ms, created FROM commands"
                     " WHERE node=? AND state='queued'")
                params: list[Any] = [node]
                if older_than is not None:
                    q += " AND (last_offer IS NULL OR last_offer < ?)"
                    params.append(older_than)
                rows = db.execute(q + " ORDER BY id", params).fetchall()
            out = []
            for cid, n, target, name, args, ttl_ms, created in rows:
                if cid in have:
                    db.execute("UPDATE commands SET state='delivered', delivered_at=? WHERE id=?", (now, cid))
                    continue
                left = None if ttl_ms is None else int(ttl_ms - (now - created) * 1000)
                if left is not None and left <= 0:
                    db.execute("UPDATE commands SET state='expired', by='cloud', finished_at=?,"
                               " error='time to live ran out before the site took it' WHERE id=?",
                               (now, cid))
                    continue
                db.execute("UPDATE commands SET offers=offers+1, last_offer=? WHERE id=?", (now, cid))
                out.append({"id": cid, "node": n, "target": target, "name": name,
                            "args": json.loads(args), "ttl_ms": left})
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def expire_due(self, now: float | None = None) -> int:
        """Mark queued commands whose TTL ran out (for ``cmd status``/``list``)."""
        now = time.time() if now is None else now
        cur = self._db.execute(
            "UPDATE commands SET state='expired', by='cloud', finished_at=?,"
            " error='time to live ran out before the site took it'"
            " WHERE state='queued' AND ttl_ms IS NOT NULL AND created*1000 + ttl_ms <= ?*1000",
            (now, now))
        return cur.rowcount

    def apply_status(self, node: str, data: Any, now: float | None = None) -> bool:
        """Apply a status event's ``data`` that came from ``node``; False if ignored."""
        if not isinstance(data, dict):
            return False
        cid, status = data.get("id"), data.get("status")
        if not isinstance(cid, str) or status not in RANK:
            return False
        now = time.time() if now is None else now
        db = self._db
        row = db.execute("SELECT node, state, by FROM commands WHERE id=?", (cid,)).fetchone()
        if row is None or row[0] != node:
            return False  # unknown, or about another node's command: the sender is the topic's node
        state, by = row[1], row[2]
        # a cloud-side expiry gives way to the site, which may have taken it just in time
        overridable = state == "expired" and by == "cloud"
        if state in FINAL and (not overridable or status == "expired"):
            return False
        held = RANK["queued"] if overridable else RANK[state]
        if RANK[status] < held or status == state:
            return False
        col = {"delivered": "delivered_at", "accepted": "accepted_at"}.get(status, "finished_at")
        reply = data.get("reply")
        err = data.get("error")
        site_time = data.get("site_time")
        db.execute(
            f"UPDATE commands SET state=?, by=?, {col}=?, reply=coalesce(?, reply),"
            " error=coalesce(?, error), site_time=coalesce(?, site_time) WHERE id=?",
            (status, str(data.get("by") or ""), now, None if reply is None else json.dumps(reply),
             None if err is None else str(err)[:2000],
             site_time if isinstance(site_time, int | float) else None, cid))
        if status != "delivered" and state == "queued":
            db.execute("UPDATE commands SET delivered_at=coalesce(delivered_at, ?) WHERE id=?", (now, cid))
        return True

    def command(self, cid: str) -> dict[str, Any] | None:
        cur = self._db.execute("SELECT * FROM commands WHERE id=?", (cid,))
        row = cur.fetchone()
        return None if row is None else self._cmd_row(cur, row)

    def commands(self, node: str, limit: int = 1000) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM commands WHERE node=? ORDER BY id DESC LIMIT ?", (node, limit))
        return [self._cmd_row(cur, r) for r in cur.fetchall()]

    @staticmethod
    def _cmd_row(cur: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        d = {c[0]: v for c, v in zip(cur.description, row, strict=True)}
        d["args"] = _loads(d["args"])
        d["reply"] = _loads(d["reply"])
        return d

    # ------------------------------------------------------------ shadows

    def set_desired(self, node: str, thing: str, doc: Any, expect: int | None = None,
                    now: float | None = None) -> int:
        """Replace the desired document; the new version. ``expect``: the version the
        caller saw (refused with :class:`VersionConflict` if another is held)."""
        if not isinstance(doc, dict):
            raise ValueError("a desired document must be a JSON object")
        body = json.dumps(doc, separators=(",", ":"))
        if len(body) > MAX_DOC_BYTES:
            raise ValueError(f"a desired document may have at most {MAX_DOC_BYTES} bytes")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT desired_version FROM shadows WHERE node=? AND thing=?",
                             (node, thing)).fetchone()
            held = row[0] if row else 0
            if expect is not None and expect != held:
                raise VersionConflict(held, expect)
            version = held + 1
            db.execute(
                "INSERT INTO shadows (node, thing, desired, desired_version, desired_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT (node, thing) DO UPDATE SET desired=excluded.desired,"
                " desired_version=excluded.desired_version, desired_at=excluded.desired_at",
                (node, thing, body, version, time.time() if now is None else now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    def desired_for(self, node: str) -> list[tuple[str, int, Any]]:
        """Every thing of a node with a desired document: (thing, version, document)."""
        rows = self._db.execute("SELECT thing, desired_version, desired FROM shadows"
                                " WHERE node=? AND desired IS NOT NULL ORDER BY thing", (node,))
        return [(t, v, json.loads(d)) for t, v, d in rows]

    def desired_versions(self, node: str) -> dict[str, int]:
        """thing -> desired version, for every thing of a node with a desired document."""
        return dict(self._db.execute("SELECT thing, desired_version FROM shadows"
                                     " WHERE node=? AND desired IS NOT NULL", (node,)).fetchall())

    def desired_doc(self, node: str, thing: str) -> tuple[int, Any] | None:
        row = self._db.execute("SELECT desired_version, desired FROM shadows WHERE node=? AND thing=?"
                               " AND desired IS NOT NULL", (node, thing)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def apply_reported(self, node: str, data: Any, now: float | None = None) -> bool:
        """Store a reported document (``data`` of ``evt/shadow/<thing>``) if newer."""
        if not isinstance(data, dict):
            return False
        thing, epoch, version, doc = data.get("thing"), data.get("epoch"), data.get("version"), data.get("reported")
        if (not isinstance(thing, str) or not isinstance(epoch, int) or not isinstance(version, int)
                or not isinstance(doc, dict)):
            return False
        db = self._db
        row = db.execute("SELECT reported_epoch, reported_version FROM shadows WHERE node=? AND thing=?",
                         (node, thing)).fetchone()
        if row is not None and (epoch, version) <= (row[0], row[1]):
            db.execute("UPDATE shadows SET stale_dropped=stale_dropped+1 WHERE node=? AND thing=?",
                       (node, thing))
            return False
        db.execute(
            "INSERT INTO shadows (node, thing, reported, reported_epoch, reported_version, reported_at)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (node, thing) DO UPDATE SET reported=excluded.reported,"
            " reported_epoch=excluded.reported_epoch, reported_version=excluded.reported_version,"
            " reported_at=excluded.reported_at",
            (node, thing, json.dumps(doc, separators=(",", ":")), epoch, version,
             time.time() if now is None else now))
        return True

    def shadow(self, node: str, thing: str) -> dict[str, Any] | None:
        cur = self._db.execute("SELECT * FROM shadows WHERE node=? AND thing=?", (node, thing))
        row = cur.fetchone()
        if row is None:
            return None
        d = {c[0]: v for c, v in zip(cur.description, row, strict=True)}
        d["desired"] = _loads(d["desired"])
        d["reported"] = _loads(d["reported"])
        return d

    # ------------------------------------------------------------ from the uplink

    def apply_records(self, rows: list[tuple[str, str, bytes]], now: float | None = None) -> int:
        """Apply status and report records ``(node, topic, payload)`` from the sink's
        rows; the number applied. One transaction."""
        try:
            return self._apply_records(rows, now)
        except sqlite3.Error as e:
            # an OSError: ingest's writer retries the batch (the sink drops what it has)
            raise SinkError(f"cannot apply statuses to the cloud state in {self.path}: {e}") from None

    def _apply_records(self, rows: list[tuple[str, str, bytes]], now: float | None) -> int:
        n = 0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for node, topic, payload in rows:
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                data = body.get("data") if isinstance(body, dict) and "specversion" in body else body
                if topic.startswith("evt/cmd/"):
                    n += self.apply_status(node, data, now)
                elif topic.startswith("evt/shadow/"):
                    n += self.apply_reported(node, data, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return n
