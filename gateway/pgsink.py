"""The PostgreSQL sink: records of a whole fleet, written by one or several ingest workers.

``--sink postgresql://user@host/db`` (docs/cloud.md). The driver (psycopg 3) is imported
only here, and this module only when such a sink is opened: the gateway never loads it.

Each batch of frames is one transaction:

1. the ``lanes`` rows of the batch's (node, epoch, lane) are locked ``FOR UPDATE``, in
   key order (so two workers wait for each other instead of deadlocking);
2. a frame covers the lane's sequence numbers ``(prev_seq, last]``; with what is held
   (``lanes.high``: everything up to it is written or recorded as a gap) and the frames
   already written ahead of a hole (``pending``), the new high is computed;
3. the records above the old high are copied (``COPY``, binary) into a temporary table and
   moved into ``records`` with ``INSERT ... ON CONFLICT DO NOTHING``: the unique key drops
   what another worker, or an earlier delivery, wrote already;
4. ``lanes`` gets the new high, what was received, and when; ``pending`` keeps what
   still waits for a hole to fill.

So two workers that each hold frames of one lane can neither both write a record nor
leave a hole unnoticed: the second waits for the first's lock and sees its high. A
frame that arrives ahead of a hole is written at once (with MQTT shared subscriptions
frames of one lane reach several workers in any order) and the hole is asked for again
(a nack) only when it is still open after ``gap_wait`` seconds (:meth:`PgSink.waiting`).
A gap notice is recorded only when it starts exactly at the lane's high (after the
batch's frames and those waiting): its count is then exactly what is missing, and no
record is counted twice (docs/wire-format.md, Gap notices).

Records are partitioned by day of ``ts`` (when the gateway received the message): the
same record carries the same ``ts`` on every resend, so it always lands in the same
partition and the key ``(node, epoch, seq, ts)`` is as unique as ``(node, epoch, seq)``.
Partitions are created a few days ahead; a record outside them (a gateway's clock far
off, or a backlog older than the partitions) goes to ``records_default`` and is moved
into its day's partition when that is created. :func:`retention` drops whole days.

The schema is created and migrated by ingest (``ef_migrations``, one row per applied
migration, under an advisory lock so that workers starting together apply each once).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from gateway.errors import SinkError

try:
    import psycopg
    from psycopg import sql
except ImportError:  # pragma: no cover - the postgresql extra is not installed
    raise SinkError("the PostgreSQL sink needs psycopg: pip install 'edgeferry[postgresql]'") from None

try:
    import orjson

    def _is_json(payload: bytes) -> bool:
        if payload[:1] not in (b"{", b"[") or b"\\u0000" in payload:
            return False  # only documents; PostgreSQL's jsonb refuses NUL in strings
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        return True
except ImportError:  # pragma: no cover - orjson is a dependency
    import json

    def _is_json(payload: bytes) -> bool:
        if payload[:1] not in (b"{", b"[") or b"\\u0000" in payload:
            return False
        try:
            json.loads(payload)
        except ValueError:
            return False
        return True

__all__ = ["PgSink", "Batch", "fleet_status", "retention", "parse_keep"]

log = logging.getLogger("edgeferry.ingest")

LaneKey = tuple[str, int, str]
# one frame: node, epoch, lane, prev_seq, records (seq, ts_ms, topic, payload) in seq order
FrameRow = tuple[str, int, str, int, list[tuple[int, int, str, bytes]]]
# a gap notice: node, epoch, lane, after, upto, missing, reason
GapRow = tuple[str, int, str, int, int, int | None, str]

_LOCK = 0x6566_7368  # advisory lock id for migrations and partition changes ("efsh")
DAYS_AHEAD = 3
DAYS_BEHIND = 2

MIGRATIONS = [
    # 1: records (partitioned by day of ts), lanes, pending, gaps
    """
    CREATE TABLE records (
        node text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, lane text NOT NULL,
        topic text NOT NULL, payload bytea NOT NULL, payload_json jsonb,
        ts timestamptz NOT NULL, ingested_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, epoch, seq, ts)
    ) PARTITION BY RANGE (ts);
    CREATE TABLE records_default PARTITION OF records DEFAULT;
    CREATE INDEX records_node_ts ON records (node, ts DESC);
    CREATE INDEX records_topic_ts ON records (topic, ts);
    CREATE TABLE lanes (
        node text NOT NULL, epoch bigint NOT NULL, lane text NOT NULL,
        high bigint NOT NULL DEFAULT 0, received bigint NOT NULL DEFAULT 0,
        last_seen timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, epoch, lane));
    CREATE TABLE pending (
        node text NOT NULL, epoch bigint NOT NULL, lane text NOT NULL,
        after bigint NOT NULL, upto bigint NOT NULL, since timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, epoch, lane, after, upto));
    CREATE TABLE gaps (
        node text NOT NULL, epoch bigint NOT NULL, lane text NOT NULL,
        after bigint NOT NULL, upto bigint NOT NULL, missing bigint, reason text NOT NULL,
        ts timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, epoch, lane, upto))
    """,
]

_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS ef_stage (node text, epoch bigint, seq bigint, lane text,"
    " topic text, payload bytea, payload_json text, ts_ms bigint) ON COMMIT DELETE ROWS"
)
_STAGE_TYPES = ["text", "int8", "int8", "text", "text", "bytea", "text", "int8"]
_MOVE = (
    "INSERT INTO records (node, epoch, seq, lane, topic, payload, payload_json, ts)"
    " SELECT node, epoch, seq, lane, topic, payload, {json}, to_timestamp(ts_ms / 1000.0)"
    " FROM ef_stage ON CONFLICT DO NOTHING"
)


class Batch:
    """What one transaction did: counts, each touched node's lane highs (for its
    confirmation), and the gap notices that were new."""

    __slots__ = ("written", "duplicates", "acks", "new_gaps")

    def __init__(self) -> None:
        self.written = 0
        self.duplicates = 0
        self.acks: dict[tuple[str, int], dict[str, int]] = {}
        self.new_gaps: list[GapRow] = []


def _cover(high: int, spans: Iterable[tuple[int, int]]) -> int:
    """The high after ``spans`` (each ``(after, upto]``): follow every span that starts
    at or below it."""
    for after, upto in sorted(spans):
        if after > high:
            break
        if upto > high:
            high = upto
    return high


def _exact_gaps(high: int, spans: list[tuple[int, int]], gaps: list[GapRow]) -> list[GapRow]:
    """The gap notices of one lane that start exactly at what is held (``high``, followed
    through ``spans``), each after the one before: only those are recorded, so no record
    is counted twice. One from below (an answer to an earlier request that reaches
    further: its count includes records held or counted since) or ahead of what is held
    is not; the hole it leaves is asked for again (:meth:`PgSink.waiting`), and the
    gateway's answer starts at the high."""
    exact = []
    high = _cover(high, spans)
    for g in sorted(gaps, key=lambda g: g[3]):
        if g[3] == high:
            exact.append(g)
            high = _cover(g[4], spans)
    return exact


def _day(d: dt.date) -> tuple[str, dt.datetime, dt.datetime]:
    lo = dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)
    return f"records_{d:%Y%m%d}", lo, lo + dt.timedelta(days=1)


class PgSink:
    """One connection to the fleet's database. Blocking; one thread at a time."""

    def __init__(self, url: str, fsync: bool = False) -> None:
        self.url = url
        self.fsync = fsync  # PostgreSQL commits durably (synchronous_commit) regardless
        self.high: dict[LaneKey, int] = {}  # not used: the database holds it (for the interface)
        self._db: psycopg.Connection[Any] | None = None
        self._partitions_checked = 0.0

    def open(self) -> None:
        try:
            db = psycopg.connect(self.url, autocommit=True, application_name="edgeferry-ingest")
        except psycopg.Error as e:
            raise SinkError(f"cannot open sink {_redact(self.url)}: {_first_line(e)}") from None
        self._db = db
        try:
            migrate(db)
            db.execute(_STAGE)
            self.ensure_partitions()
        except psycopg.Error as e:
            raise SinkError(f"cannot prepare sink {_redact(self.url)}: {_first_line(e)}") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed:
            raise SinkError("sink is not open")
        return self._db

    # -- partitions ------------------------------------------------------------------

    def ensure_partitions(self, today: dt.date | None = None) -> list[str]:
        """Create the daily partitions from DAYS_BEHIND before today to DAYS_AHEAD after
        (moving rows of those days out of the default partition); return those created."""
        today = today or dt.datetime.now(dt.UTC).date()
        self._partitions_checked = time.monotonic()
        return ensure_partitions(self.db, [today + dt.timedelta(days=n)
                                           for n in range(-DAYS_BEHIND, DAYS_AHEAD + 1)])

    # -- writing ---------------------------------------------------------------------

    def write_frames(self, frames: list[FrameRow], gaps: Iterable[GapRow] = ()) -> Batch:
        """Write a batch of frames and gap notices in one transaction (see the module)."""
        if time.monotonic() - self._partitions_checked > 3600:
            try:
                self.ensure_partitions()
            except psycopg.Error as e:
                log.error("cannot create partitions ahead: %s", _first_line(e))
        for attempt in range(5):
            try:
                return self._write(frames, gaps, json_ok=attempt == 0 or not self._bad_json)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as e:
                log.warning("sink transaction retried: %s", _first_line(e))
            except psycopg.DataError as e:
                # a payload PostgreSQL's jsonb refused after all: this batch without jsonb
                log.warning("a payload was refused as jsonb (%s): batch written without "
                            "payload_json", _first_line(e))
                self._bad_json = True
            except psycopg.Error as e:
                raise SinkError(f"cannot write sink {_redact(self.url)}: {_first_line(e)}") from None
        raise SinkError(f"cannot write sink {_redact(self.url)}: retried 5 times")

    _bad_json = False

    def _write(self, frames: list[FrameRow], gaps: Iterable[GapRow], json_ok: bool) -> Batch:
        self._bad_json = False
        db = self.db
        out = Batch()
        spans: dict[LaneKey, list[tuple[int, int]]] = {}
        for node, epoch, lane, prev, recs in frames:
            if recs and prev < recs[-1][0]:
                spans.setdefault((node, epoch, lane), []).append((prev, recs[-1][0]))
        gap_list = [g for g in gaps if g[3] < g[4]]
        keys = sorted({*spans, *(g[:3] for g in gap_list)})
        if not keys:
            return out
        cols = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
        with db.transaction(), db.cursor() as cur:
            cur.execute("INSERT INTO lanes (node, epoch, lane) SELECT * FROM"
                        " unnest(%s::text[], %s::bigint[], %s::text[]) ON CONFLICT DO NOTHING", cols)
            cur.execute("SELECT l.node, l.epoch, l.lane, l.high, l.received FROM lanes l"
                        " JOIN unnest(%s::text[], %s::bigint[], %s::text[]) AS k(node, epoch, lane)"
                        " USING (node, epoch, lane) ORDER BY 1, 2, 3 FOR UPDATE OF l", cols)
            held = {(r[0], r[1], r[2]): (r[3], r[4]) for r in cur.fetchall()}
            cur.execute("SELECT p.node, p.epoch, p.lane, p.after, p.upto FROM pending p"
                        " JOIN unnest(%s::text[], %s::bigint[], %s::text[]) AS k(node, epoch, lane)"
                        " USING (node, epoch, lane)", cols)
            waiting: dict[LaneKey, list[tuple[int, int]]] = {}
            for r in cur.fetchall():
                waiting.setdefault((r[0], r[1], r[2]), []).append((r[3], r[4]))
            by_lane: dict[LaneKey, list[GapRow]] = {}
            for g in gap_list:
                by_lane.setdefault(g[:3], []).append(g)
            gap_list = []
            for k, notices in by_lane.items():
                gap_list += _exact_gaps(held[k][0], spans.get(k, []) + waiting.get(k, []), notices)
            for g in gap_list:
                spans.setdefault(g[:3], []).append((g[3], g[4]))
            new_high = {k: _cover(held[k][0], spans.get(k, []) + waiting.get(k, [])) for k in keys}
            # the records above what was held (below it: written before, or a known gap)
            staged = 0
            with cur.copy("COPY ef_stage FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(_STAGE_TYPES)
                for node, epoch, lane, prev, recs in frames:
                    if not recs or prev >= recs[-1][0]:
                        continue
                    high = held[(node, epoch, lane)][0]
                    if recs[-1][0] <= high:
                        out.duplicates += len(recs)
                        continue
                    for seq, ts, topic, payload in recs:
                        if seq <= high:
                            out.duplicates += 1
                            continue
                        doc = payload.decode() if json_ok and _is_json(payload) else None
                        cp.write_row((node, epoch, seq, lane, topic, payload, doc, ts))
                        staged += 1
            if staged:
                cur.execute(_MOVE.format(json="payload_json::jsonb" if json_ok else "NULL"))
                out.written = cur.rowcount
                out.duplicates += staged - cur.rowcount
            # gaps: recorded once
            for g in gap_list:
                cur.execute("INSERT INTO gaps (node, epoch, lane, after, upto, missing, reason)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", g)
                if cur.rowcount:
                    out.new_gaps.append(g)
            # lanes and what still waits behind a hole
            ups = [(k[0], k[1], k[2], new_high[k], max((s[1] for s in spans.get(k, ())), default=0)) for k in keys]
            cur.execute(
                "UPDATE lanes l SET high = u.high, received = greatest(l.received, u.received),"
                " last_seen = now() FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[],"
                " %s::bigint[]) AS u(node, epoch, lane, high, received)"
                " WHERE (l.node, l.epoch, l.lane) = (u.node, u.epoch, u.lane)",
                tuple(list(c) for c in zip(*ups, strict=True)))
            ahead = [(k[0], k[1], k[2], a, u) for k in keys for a, u in spans.get(k, ()) if a > new_high[k]]
            cur.execute("DELETE FROM pending p USING unnest(%s::text[], %s::bigint[], %s::text[],"
                        " %s::bigint[]) AS u(node, epoch, lane, high) WHERE (p.node, p.epoch, p.lane)"
                        " = (u.node, u.epoch, u.lane) AND p.upto <= u.high",
                        (cols[0], cols[1], cols[2], [new_high[k] for k in keys]))
            if ahead:
                cur.executemany("INSERT INTO pending (node, epoch, lane, after, upto)"
                                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", ahead)
            # confirmations: every lane of each touched (node, epoch)
            nodes = sorted({(k[0], k[1]) for k in keys})
            cur.execute("SELECT l.node, l.epoch, l.lane, l.high FROM lanes l JOIN"
                        " unnest(%s::text[], %s::bigint[]) AS n(node, epoch) USING (node, epoch)",
                        ([n[0] for n in nodes], [n[1] for n in nodes]))
            for node, epoch, lane, high in cur.fetchall():
                out.acks.setdefault((node, epoch), {})[lane] = high
        return out

    def write(self, rows: list[tuple[str, int, str, int, int, str, bytes]]) -> tuple[int, int]:
        """Rows without frames (each its own span): for tools and tests."""
        frames: list[FrameRow] = [(n, e, lane, s - 1, [(s, ts, t, p)]) for n, e, lane, s, ts, t, p in rows]
        b = self.write_frames(frames)
        return b.written, b.duplicates

    def write_gap(self, gap: GapRow) -> bool:
        return bool(self.write_frames([], [gap]).new_gaps)

    # -- reading ---------------------------------------------------------------------

    def waiting(self, older_than: float) -> dict[LaneKey, int]:
        """Lanes with frames written ahead of a hole for longer than ``older_than`` seconds:
        their high (what to ask the gateway to resend after)."""
        try:
            rows = self.db.execute(
                "SELECT l.node, l.epoch, l.lane, l.high FROM lanes l JOIN (SELECT node, epoch, lane"
                " FROM pending GROUP BY 1, 2, 3 HAVING min(since) < now() - make_interval(secs => %s))"
                " p USING (node, epoch, lane)", (older_than,)).fetchall()
        except psycopg.Error as e:
            raise SinkError(f"cannot read sink {_redact(self.url)}: {_first_line(e)}") from None
        return {(r[0], r[1], r[2]): r[3] for r in rows}


# -- schema ----------------------------------------------------------------------------

def migrate(db: psycopg.Connection[Any]) -> int:
    """Apply the migrations not applied yet; return the schema version."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS ef_migrations (version int PRIMARY KEY,"
                   " applied_at timestamptz NOT NULL DEFAULT now())")
        row = db.execute("SELECT coalesce(max(version), 0) FROM ef_migrations").fetchone()
        have = row[0] if row else 0
        if have > len(MIGRATIONS):
            raise SinkError(f"database schema {have} is newer than this edgeferry ({len(MIGRATIONS)})")
        for n in range(have, len(MIGRATIONS)):
            for stmt in MIGRATIONS[n].split(";"):
                if stmt.strip():
                    db.execute(stmt)  # type: ignore[call-overload]
            db.execute("INSERT INTO ef_migrations (version) VALUES (%s)", (n + 1,))
    return len(MIGRATIONS)


def ensure_partitions(db: psycopg.Connection[Any], days: Iterable[dt.date]) -> list[str]:
    created = []
    for d in days:
        name, lo, hi = _day(d)
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            if db.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,):
                continue
            moved = db.execute("SELECT 1 FROM records_default WHERE ts >= %s AND ts < %s LIMIT 1",
                               (lo, hi)).fetchone()
            ident = sql.Identifier(name)
            if moved:
                # rows of this day wait in the default partition: move them into the new one
                db.execute("ALTER TABLE records DETACH PARTITION records_default")
                db.execute(sql.SQL("CREATE TABLE {} PARTITION OF records FOR VALUES FROM ({}) TO ({})")
                           .format(ident, sql.Literal(lo), sql.Literal(hi)))
                db.execute("INSERT INTO records SELECT * FROM records_default WHERE ts >= %s AND ts < %s",
                           (lo, hi))
                db.execute("DELETE FROM records_default WHERE ts >= %s AND ts < %s", (lo, hi))
                db.execute("ALTER TABLE records ATTACH PARTITION records_default DEFAULT")
            else:
                db.execute(sql.SQL("CREATE TABLE {} PARTITION OF records FOR VALUES FROM ({}) TO ({})")
                           .format(ident, sql.Literal(lo), sql.Literal(hi)))
            created.append(name)
    return created


_KEEP = re.compile(r"^(\d+)([dhw])$")


def parse_keep(text: str) -> dt.timedelta:
    """``90d``, ``12w`` or ``48h``."""
    m = _KEEP.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"--keep {text!r}: expected a duration like 90d, 12w or 48h")
    n, unit = int(m.group(1)), m.group(2)
    return {"d": dt.timedelta(days=n), "w": dt.timedelta(weeks=n), "h": dt.timedelta(hours=n)}[unit]


def retention(url: str, keep: dt.timedelta, *, dry_run: bool = False,
              now: dt.datetime | None = None) -> tuple[list[str], int]:
    """Drop the daily partitions that end before ``now - keep`` and delete the default
    partition's rows older than that; return (partitions dropped, default rows deleted),
    or with ``dry_run`` what would be."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - keep
    try:
        with psycopg.connect(url, autocommit=True) as db:
            if db.execute("SELECT to_regclass('records')").fetchone() == (None,):
                raise SinkError(f"{_redact(url)} holds no edgeferry records (table records)")
            rows = db.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'records'::regclass"
                " AND c.relname <> 'records_default' ORDER BY 1").fetchall()
            old = []
            for name, _bound in rows:
                m = re.fullmatch(r"records_(\d{8})", name)
                if m is None:
                    continue
                _n, _lo, hi = _day(dt.datetime.strptime(m.group(1), "%Y%m%d").date())
                if hi <= cutoff:
                    old.append(name)
            if dry_run:
                row = db.execute("SELECT count(*) FROM records_default WHERE ts < %s", (cutoff,)).fetchone()
                return old, int(row[0]) if row else 0
            for name in old:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                    db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            cur = db.execute("DELETE FROM records_default WHERE ts < %s", (cutoff,))
            return old, cur.rowcount
    except psycopg.Error as e:
        raise SinkError(f"retention on {_redact(url)}: {_first_line(e)}") from None


def fleet_status(url: str, limit: int = 1000, node: str | None = None) -> list[dict[str, Any]]:
    """Per node and lane, from the database (any worker's writes): last seen, highest seq
    received and written with nothing missing (``lag`` between them), frames waiting
    ahead of a hole, gaps recorded; the most recently seen first."""
    q = ("SELECT l.node, l.epoch, l.lane, l.high, l.received, greatest(l.received - l.high, 0) AS lag,"
         " l.last_seen, (SELECT count(*) FROM pending p WHERE (p.node, p.epoch, p.lane) ="
         " (l.node, l.epoch, l.lane)) AS waiting, (SELECT count(*) FROM gaps g WHERE"
         " (g.node, g.epoch, g.lane) = (l.node, l.epoch, l.lane)) AS gaps FROM lanes l"
         + (" WHERE l.node = %s" if node is not None else "")
         + " ORDER BY l.last_seen DESC, l.node, l.lane LIMIT %s")
    params: tuple[Any, ...] = (node, limit) if node is not None else (limit,)
    try:
        with psycopg.connect(url) as db:
            if db.execute("SELECT to_regclass('lanes')").fetchone() == (None,):
                raise SinkError(f"{_redact(url)} holds no edgeferry records (table lanes)")
            cur = db.execute(q, params)  # type: ignore[arg-type]
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except psycopg.Error as e:
        raise SinkError(f"cannot read sink {_redact(url)}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)
