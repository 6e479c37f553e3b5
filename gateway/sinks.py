"""Where ingest writes: JSONL or SQLite, one row per original message, never twice.

Both sinks drop duplicates by ``(node, epoch, seq)``, know at start the highest seq they
hold per (node, epoch, lane) (``high``: ingest's continuity check and its confirmations
to gateways start from it), and survive a kill -9 of ingest:

* JSONL keeps an in-memory set of sequence ranges per (node, epoch), rebuilt at start
  by scanning the file (a half-written last line from a crash is cut off first).
* SQLite has a primary key on (node, epoch, seq) and inserts with ``OR IGNORE``.

A row: ``node``, ``epoch``, ``seq``, ``lane``, ``topic`` (the original local topic),
``payload`` (UTF-8 text, or base64 with ``encoding: "base64"``), ``ts`` (RFC 3339 UTC,
when the gateway received the message).

A gap (records a gateway no longer held when ingest asked for them, docs/wire-format.md)
is kept beside the records, once per (node, epoch, lane, upto): in the table ``gaps``
(SQLite) or the file ``<name>.gaps.jsonl`` next to ``<name>.jsonl``, as ``node``,
``epoch``, ``lane``, ``after``, ``upto``, ``missing`` (null: unknown), ``reason``, ``ts``
(when ingest recorded it). ``high`` counts a gap's ``upto`` as held, so a restarted
ingest goes on after it.
"""

from __future__ import annotations

import base64
import bisect
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from edge.events import rfc3339_ms
from gateway.errors import SinkError

if TYPE_CHECKING:
    from gateway.pgsink import PgSink

try:
    import orjson

    _dumps: Callable[[object], bytes] = orjson.dumps  # the C function itself: called per row

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)
except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    import json

    def _dumps(obj: object) -> bytes:  # type: ignore[misc]
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data)


SINK_FORMS = "expected jsonl:PATH, sqlite:PATH or postgresql://USER@HOST/DB"

__all__ = ["SeqSet", "is_postgres", "JsonlSink", "SqliteSink", "gaps_path", "group_rows", "open_sink", "read_gaps",
           "rfc3339"]

Row = tuple[str, int, str, int, int, str, bytes]  # node, epoch, lane, seq, ts_ms, topic, payload
Records = tuple[str, int, str, list[tuple[int, int, str, bytes]]]  # node, epoch, lane, a frame's records
GapRow = tuple[str, int, str, int, int, int | None, str]  # node, epoch, lane, after, upto, missing, reason


def group_rows(rows: list[Row]) -> list[Records]:
    """Rows as (node, epoch, lane, records) groups, in order."""
    groups: list[Records] = []
    key = None
    for node, epoch, lane, seq, ts, topic, payload in rows:
        if (node, epoch, lane) != key:
            key = (node, epoch, lane)
            recs: list[tuple[int, int, str, bytes]] = []
            groups.append((node, epoch, lane, recs))
        recs.append((seq, ts, topic, payload))
    return groups


def gaps_path(path: str | Path) -> Path:
    """Where a JSONL sink keeps its gaps: ``events.jsonl`` -> ``events.gaps.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem if p.suffix == '.jsonl' else p.name}.gaps.jsonl")


class SeqSet:
    """A set of integers kept as sorted, disjoint, closed ranges."""

    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __len__(self) -> int:
        return sum(h - lo + 1 for lo, h in zip(self._lo, self._hi, strict=True))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))

    def add(self, n: int) -> bool:
        """Add n; False if it was already there."""
        lo, hi = self._lo, self._hi
        if hi and n == hi[-1] + 1:  # the common case: the next number
            hi[-1] = n
            return True
        i = bisect.bisect_right(lo, n) - 1
        if i >= 0 and n <= hi[i]:
            return False
        if i >= 0 and n == hi[i] + 1:
            hi[i] = n
            if i + 1 < len(lo) and lo[i + 1] == n + 1:
                hi[i] = hi[i + 1]
                del lo[i + 1], hi[i + 1]
            return True
        if i + 1 < len(lo) and lo[i + 1] == n + 1:
            lo[i + 1] = n
            return True
        lo.insert(i + 1, n)
        hi.insert(i + 1, n)
        return True

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._lo, n) - 1
        return i >= 0 and n <= self._hi[i]

    @property
    def last(self) -> int:
        """The largest number held (-1 when empty)."""
        return self._hi[-1] if self._hi else -1

    def update(self, other: SeqSet) -> None:
        """Add every number of ``other``: whole ranges above this set's last."""
        lo, hi = self._lo, self._hi
        for a, b in zip(other._lo, other._hi, strict=True):
            if not hi or a > hi[-1] + 1:
                lo.append(a)
                hi.append(b)
            elif a == hi[-1] + 1:
                hi[-1] = max(hi[-1], b)
            else:
                for n in range(a, b + 1):
                    self.add(n)


rfc3339 = rfc3339_ms  # a row's received_at


def _payload_fields(payload: bytes) -> tuple[str, str | None]:
    try:
        return payload.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode(), "base64"


class JsonlSink:
    _KEY = re.compile(rb'^\{"node":"((?:[^"\\]|\\.)*)","epoch":(\d+),"seq":(\d+),"lane":"([a-z0-9_]*)"')

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.seen: dict[tuple[str, int], SeqSet] = {}
        self.high: dict[tuple[str, int, str], int] = {}
        self.gaps: set[tuple[str, int, str, int]] = set()
        self._f: BinaryIO | None = None
        self._quoted: dict[str, bytes] = {}

    def _quote(self, s: str) -> bytes:
        """JSON string of a node, lane or topic, cached (bounded)."""
        if len(self._quoted) > 100_000:
            self._quoted.clear()
        q = self._quoted[s] = _dumps(s)  # type: ignore[arg-type]
        return q

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(self.path, "a+b")
        except OSError as e:
            raise SinkError(f"cannot open sink {self.path}: {e.strerror}") from None
        f.seek(0)
        good = 0
        key = self._KEY
        for line in f:
            if not line.endswith(b"\n"):
                break  # half-written by a crash: cut off below
            m = key.match(line)
            if m:
                k = (m.group(1).decode(), int(m.group(2)))
                seen = self.seen.get(k)
                if seen is None:
                    seen = self.seen[k] = SeqSet()
                seq = int(m.group(3))
                seen.add(seq)
                hk = (k[0], k[1], m.group(4).decode())
                if seq > self.high.get(hk, 0):
                    self.high[hk] = seq
            good += len(line)
        if good != f.tell():
            f.truncate(good)
        f.seek(0, os.SEEK_END)
        self._f = f
        gp = gaps_path(self.path)
        try:
            with open(gp, "rb") as g:
                for line in g:
                    if line.endswith(b"\n"):
                        d = _loads(line)
                        self._note_gap(d["node"], d["epoch"], d["lane"], d["upto"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SinkError(f"cannot read the gaps of sink {self.path} ({gp}): {e}") from None

    def _note_gap(self, node: str, epoch: int, lane: str, upto: int) -> bool:
        key = (node, epoch, lane, upto)
        if key in self.gaps:
            return False
        self.gaps.add(key)
        if upto > self.high.get(key[:3], 0):
            self.high[key[:3]] = upto
        return True

    def write_gap(self, gap: GapRow) -> bool:
        """Record a gap once; False if it was recorded before."""
        node, epoch, lane, after, upto, missing, reason = gap
        if (node, epoch, lane, upto) in self.gaps:
            return False
        line = _dumps({"node": node, "epoch": epoch, "lane": lane, "after": after, "upto": upto,
                       "missing": missing, "reason": reason, "ts": rfc3339(int(time.time() * 1000))})
        try:
            with open(gaps_path(self.path), "ab") as g:
                g.write(line + b"\n")
                g.flush()
                if self.fsync:
                    os.fsync(g.fileno())
        except OSError as e:
            raise SinkError(f"cannot write the gaps of sink {self.path}: {e.strerror}") from None
        return self._note_gap(node, epoch, lane, upto)

    def write(self, rows: list[Row]) -> tuple[int, int]:
        """Write rows not seen before; return (written, duplicates)."""
        return self.write_records(group_rows(rows))

    def write_records(self, groups: list[Records]) -> tuple[int, int]:
        """Write the records of each (node, epoch, lane, records) not seen before, in
        order; return (written, duplicates). A record above every seq of its (node, epoch)
        held so far (the file's and this call's) is new without a lookup: a drain's are."""
        if self._f is None:
            raise SinkError("sink is not open")
        out: list[bytes] = []
        dups = 0
        quoted = self._quoted
        pending: dict[tuple[str, int], SeqSet] = {}  # new this call: marked seen once written
        mids: dict[str, dict[str, bytes]] = {}  # lane -> topic -> the row's middle
        last_ts, ts_tail, b64_tail = -1, b"", b""
        for node, epoch, lane, records in groups:
            k = (node, epoch)
            seen = self.seen.get(k)
            pend = pending.get(k)
            if pend is None:
                pend = pending[k] = SeqSet()
            top = max(seen.last if seen is not None else -1, pend.last)
            lo, hi = pend._lo, pend._hi
            lane_mids = mids.setdefault(lane, {})
            prefix = b'{"node":%b,"epoch":%d,"seq":' % (quoted.get(node) or self._quote(node), epoch)
            for seq, ts, topic, payload in records:
                if seq > top:  # the common case: extend the pending ranges in place
                    top = seq
                    if hi and hi[-1] + 1 == seq:
                        hi[-1] = seq
                    else:
                        lo.append(seq)
                        hi.append(seq)
                elif (seen is not None and seq in seen) or not pend.add(seq):
                    dups += 1
                    continue
                if ts != last_ts:
                    stamp = rfc3339(ts).encode()
                    last_ts, ts_tail = ts, b',"ts":"%b"}\n' % stamp
                    b64_tail = b',"encoding":"base64","ts":"%b"}\n' % stamp
                mid = lane_mids.get(topic)
                if mid is None:
                    mid = lane_mids[topic] = b',"lane":%b,"topic":%b,"payload":' % (
                        quoted.get(lane) or self._quote(lane), quoted.get(topic) or self._quote(topic))
                # the same keys, in the same order, as a dict through orjson (tests hold it);
                # one line at once: keeping orjson's own outputs alive costs more (measured)
                try:
                    out.append(b"".join((prefix, b"%d" % seq, mid, _dumps(payload.decode("utf-8")), ts_tail)))
                except UnicodeDecodeError:
                    out.append(b"".join((prefix, b"%d" % seq, mid, b'"%b"' % base64.b64encode(payload), b64_tail)))
        if out:
            try:
                self._f.write(b"".join(out))
                self._f.flush()
                if self.fsync:
                    os.fsync(self._f.fileno())
            except OSError as e:
                # nothing is marked seen: a retry writes these rows again
                raise SinkError(f"cannot write sink {self.path}: {e.strerror}") from None
        for k, pend in pending.items():
            seen = self.seen.get(k)
            if seen is None:
                self.seen[k] = pend
            else:
                seen.update(pend)
        return len(out), dups

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class SqliteSink:
    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.high: dict[tuple[str, int, str], int] = {}
        self.gaps: set[tuple[str, int, str, int]] = set()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS records (node TEXT NOT NULL, epoch INTEGER NOT NULL,"
                " seq INTEGER NOT NULL, lane TEXT NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL,"
                " encoding TEXT, ts TEXT NOT NULL, PRIMARY KEY (node, epoch, seq)) WITHOUT ROWID"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS gaps (node TEXT NOT NULL, epoch INTEGER NOT NULL,"
                " lane TEXT NOT NULL, after INTEGER NOT NULL, upto INTEGER NOT NULL, missing INTEGER,"
                " reason TEXT NOT NULL, ts TEXT NOT NULL, PRIMARY KEY (node, epoch, lane, upto))"
            )
            for node, epoch, lane, high in db.execute(
                "SELECT node, epoch, lane, max(seq) FROM records GROUP BY node, epoch, lane"
            ):
                self.high[(node, epoch, lane)] = high
            for node, epoch, lane, upto in db.execute("SELECT node, epoch, lane, upto FROM gaps"):
                self.gaps.add((node, epoch, lane, upto))
                if upto > self.high.get((node, epoch, lane), 0):
                    self.high[(node, epoch, lane)] = upto
        except sqlite3.Error as e:
            raise SinkError(f"cannot open sink {self.path}: {e}") from None
        self._db = db

    def write(self, rows: list[Row]) -> tuple[int, int]:
        db = self._db
        if db is None:
            raise SinkError("sink is not open")
        values = []
        for node, epoch, lane, seq, ts, topic, payload in rows:
            text, enc = _payload_fields(payload)
            values.append((node, epoch, seq, lane, topic, text, enc, rfc3339(ts)))
        try:
            before = db.total_changes
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?)", values)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise SinkError(f"cannot write sink {self.path}: {e}") from None
        written = db.total_changes - before
        return written, len(values) - written

    def write_records(self, groups: list[Records]) -> tuple[int, int]:
        return self.write([(n, e, lane, *r) for n, e, lane, recs in groups for r in recs])

    def write_gap(self, gap: GapRow) -> bool:
        """Record a gap once; False if it was recorded before."""
        db = self._db
        if db is None:
            raise SinkError("sink is not open")
        node, epoch, lane, after, upto, missing, reason = gap
        if (node, epoch, lane, upto) in self.gaps:
            return False
        try:
            db.execute("INSERT OR IGNORE INTO gaps VALUES (?,?,?,?,?,?,?,?)",
                       (node, epoch, lane, after, upto, missing, reason, rfc3339(int(time.time() * 1000))))
        except sqlite3.Error as e:
            raise SinkError(f"cannot write sink {self.path}: {e}") from None
        self.gaps.add((node, epoch, lane, upto))
        if upto > self.high.get((node, epoch, lane), 0):
            self.high[(node, epoch, lane)] = upto
        return True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def is_postgres(spec: str) -> bool:
    """Is a sink spec a PostgreSQL URL (``postgresql://...``, gateway/pgsink.py)?"""
    return spec.startswith(("postgresql://", "postgres://"))


def open_sink(spec: str, fsync: bool = False) -> JsonlSink | SqliteSink | PgSink:
    kind, _, path = spec.partition(":")
    if is_postgres(spec):
        from gateway.pgsink import PgSink  # the driver only when this sink is used

        sink: JsonlSink | SqliteSink | PgSink = PgSink(spec, fsync)
    elif kind == "jsonl" and path:
        sink = JsonlSink(path, fsync)
    elif kind == "sqlite" and path:
        sink = SqliteSink(path, fsync)
    else:
        raise SinkError(f"sink {spec!r}: {SINK_FORMS}")
    sink.open()
    return sink


def read_sink(spec: str) -> list[dict[str, object]]:
    """Every row of a sink, as dicts (for tests, `sim verify` and inspection)."""
    import json

    kind, _, path = spec.partition(":")
    if is_postgres(spec):
        return _read_pg(spec, "SELECT node, epoch, seq, lane, topic, payload, ts FROM records"
                              " ORDER BY node, epoch, seq")
    if kind == "jsonl":
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.endswith(b"\n")]
    if kind == "sqlite":
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM records ORDER BY node, epoch, seq")]
        finally:
            db.close()
    raise SinkError(f"sink {spec!r}: {SINK_FORMS}")


def read_gaps(spec: str) -> list[dict[str, object]]:
    """Every gap a sink recorded, as dicts (for tests and inspection)."""
    kind, _, path = spec.partition(":")
    if is_postgres(spec):
        return _read_pg(spec, "SELECT node, epoch, lane, after, upto, missing, reason, ts FROM gaps"
                              " ORDER BY node, epoch, lane, upto")
    if kind == "jsonl":
        try:
            with open(gaps_path(path), "rb") as f:
                return [_loads(line) for line in f if line.endswith(b"\n")]
        except FileNotFoundError:
            return []
    if kind == "sqlite":
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM gaps ORDER BY node, epoch, lane, upto")]
        except sqlite3.OperationalError:  # a sink written before gaps were recorded
            return []
        finally:
            db.close()
    raise SinkError(f"sink {spec!r}: {SINK_FORMS}")


def _read_pg(spec: str, query: str) -> list[dict[str, object]]:
    """Rows of a PostgreSQL sink as the other sinks give them (payload as text, or
    base64 with ``encoding``; ts in RFC 3339)."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        with psycopg.connect(spec, row_factory=dict_row) as db:
            rows = db.execute(query).fetchall()  # type: ignore[arg-type]
    except psycopg.Error as e:
        raise SinkError(f"cannot read sink: {str(e).strip().splitlines()[0]}") from None
    out: list[dict[str, object]] = []
    for r in rows:
        d = dict(r)
        if "payload" in d:
            text, enc = _payload_fields(bytes(d["payload"]))
            d["payload"] = text
            if enc:
                d["encoding"] = enc
        d["ts"] = rfc3339(int(d["ts"].timestamp() * 1000))
        out.append(d)
    return out
