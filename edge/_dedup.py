"""A bounded table of event ids already handled, with a TTL, optionally on disk.

The service marks an id once its handler returned (or the message was dead-lettered),
writes the marks of one event-loop turn to disk in one ``write``, and only then
acknowledges those messages to the broker. A redelivery after a crash therefore finds
the id and is acknowledged without running the handler again.

Bounds: at most ``max_entries`` ids (the oldest are forgotten first) and none older
than ``ttl`` seconds. The ids live in an insertion-ordered dict, so a lookup never
touches the disk.

On disk the table is an append-only log (``<name>.dedup``), not a database: a handled
message costs one record of about 40 bytes, about 80 with the rewrites below (SQLite in
WAL mode wrote about 10 KB per message when each loop turn carried one mark, which on an
SD card adds up), and the process needs no SQLite (about 1.5 MB of resident memory).
When the log holds more than ``COMPACT_FACTOR`` times ``max_entries`` records, it is
rewritten with the live ids only (temporary file, rename). The log is not fsynced per
write: a killed process loses nothing (the data is in the page cache); a power cut may
lose the last marks, whose handlers then run again (at least once still holds; derived
event ids stay the same, see docs/events.md).

Record: ``crc32 (u32) | time (f64) | id length (u16) | id (UTF-8)``, little endian, the
checksum over everything after it. A file starts with :data:`MAGIC`. Reading stops at
the first record that is short or fails its checksum (a write cut by a crash or a full
disk) and the file is cut back to the last good record; a file with a wrong header is
moved aside (``.corrupt-<time>``) and the table starts empty.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from binascii import crc32

__all__ = ["COMPACT_FACTOR", "MAGIC", "DedupTable"]

MAGIC = b"EFDEDUP1"
COMPACT_FACTOR = 2
_HEAD = struct.Struct("<IdH")  # crc32, time, id length
_BODY = struct.Struct("<dH")
_MAX_ID = 0xFFFF

log = logging.getLogger("edge.service")


def _record(event_id: str, ts: float) -> bytes:
    raw = event_id.encode("utf-8", "surrogatepass")[:_MAX_ID]
    body = _BODY.pack(ts, len(raw)) + raw
    return crc32(body).to_bytes(4, "little") + body


class DedupTable:
    def __init__(
        self, path: str | None, *, ttl: float = 86400.0, max_entries: int = 10_000
    ) -> None:
        self.path = path
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._ids: dict[str, float] = {}
        self._pending: list[tuple[str, float]] = []
        self._fd: int | None = None
        self._records = 0  # records in the file (live or not)
        self._size = 0  # bytes of the file known good
        self._rewrite = False  # the file's tail is not trusted: rewrite at the next commit
        self._now = time.time()  # one float object per commit, shared by its marks
        self.recovered: dict[str, int] = {"records": 0, "cut_bytes": 0}
        if path is not None:
            self._open(path)

    # ------------------------------------------------------------------ opening

    def _open(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            data = _read_all(fd)
            if not data:
                os.write(fd, MAGIC)
                data = MAGIC
            elif not data.startswith(MAGIC):
                os.close(fd)
                fd = -1
                aside = f"{path}.corrupt-{int(time.time())}"
                os.replace(path, aside)
                log.warning("dedup table %s has no valid header; moved aside to %s", path, aside)
                return self._open(path)
            good, records = self._load(data)
            if good < len(data):
                self.recovered["cut_bytes"] = len(data) - good
                log.warning(
                    "dedup table %s: cut %d bytes of an unfinished write at its end",
                    path,
                    len(data) - good,
                )
                os.ftruncate(fd, good)
            self._records = records
            self._size = good
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self._fd = fd
        self.recovered["records"] = len(self._ids)
        if self.path is not None and not records:
            self._import_sqlite(self.path)

    def _load(self, data: bytes) -> tuple[int, int]:
        """Read records into ``_ids``; return (offset after the last good one, count)."""
        ids: dict[str, float] = {}
        pos = len(MAGIC)
        n = 0
        end = len(data)
        head = _HEAD.size
        limit = self.max_entries
        while pos + head <= end:
            crc, ts, ln = _HEAD.unpack_from(data, pos)
            stop = pos + head + ln
            if stop > end or crc32(data[pos + 4 : stop]) != crc:
                break
            event_id = data[pos + head : stop].decode("utf-8", "surrogatepass")
            ids.pop(event_id, None)
            ids[event_id] = ts
            if len(ids) > limit:  # the newest max_entries ids are all that can survive
                del ids[next(iter(ids))]
            pos = stop
            n += 1
        cutoff = time.time() - self.ttl
        self._ids = {k: v for k, v in ids.items() if v >= cutoff}
        return pos, n

    def _import_sqlite(self, path: str) -> None:
        """Carry the ids of the SQLite table earlier builds kept (``<name>.dedup.sqlite``)."""
        old = path + ".sqlite"
        if not os.path.exists(old):
            return
        import sqlite3

        db = sqlite3.connect(old)
        try:
            rows = db.execute(
                "SELECT id, ts FROM (SELECT id, ts FROM seen ORDER BY ts DESC LIMIT ?) "
                "ORDER BY ts",
                (self.max_entries,),
            ).fetchall()
        except sqlite3.Error as e:
            log.warning("dedup table %s: not imported (%s)", old, e)
            rows = []
        finally:
            db.close()
        self._now = time.time()
        cutoff = self._now - self.ttl
        for event_id, ts in rows:
            if ts >= cutoff:
                self._ids[event_id] = ts
                self._pending.append((event_id, ts))
        self.commit()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(old + suffix)
            except FileNotFoundError:
                pass
        log.info("dedup table: imported %d ids from %s", len(rows), old)

    # ------------------------------------------------------------------ the table

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: str) -> bool:
        ts = self._ids.get(event_id)
        return ts is not None and ts >= time.time() - self.ttl

    def add(self, event_id: str) -> None:
        """Mark an id; it is durable after the next :meth:`commit`."""
        now = self._now
        self._ids.pop(event_id, None)
        self._ids[event_id] = now
        if self._fd is not None:
            self._pending.append((event_id, now))
        if len(self._ids) > self.max_entries:
            self._trim()

    def commit(self) -> None:
        """Write the marks made since the last commit (one ``write``)."""
        self._now = time.time()
        if self._fd is None:
            self._pending.clear()
            return
        if self._rewrite or self._records + len(self._pending) > COMPACT_FACTOR * max(
            self.max_entries, 1000
        ):
            self._pending.clear()
            self._compact()
            return
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        buf = b"".join([_record(k, ts) for k, ts in pending])
        try:
            _write_all(self._fd, buf)
        except OSError:
            self._cut_back()
            raise
        self._size += len(buf)
        self._records += len(pending)

    def _cut_back(self) -> None:
        """After a failed write: drop what part of it reached the file."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._rewrite = True

    def _compact(self) -> None:
        """Rewrite the file with the live ids only."""
        assert self.path is not None and self._fd is not None
        tmp = self.path + ".tmp"
        buf = MAGIC + b"".join([_record(k, ts) for k, ts in self._ids.items()])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, buf)
        finally:
            os.close(fd)
        # no fsync (it would stall the event loop on an SD card): a power cut can at
        # worst leave a short or empty file, which reads as fewer marks
        os.replace(tmp, self.path)
        new = os.open(self.path, os.O_RDWR | os.O_APPEND)
        os.close(self._fd)
        self._fd = new
        self._records = len(self._ids)
        self._size = len(buf)
        self._rewrite = False

    def expire(self) -> int:
        """Forget ids older than the TTL; returns how many (the file forgets them at its
        next rewrite, and on reading)."""
        cutoff = time.time() - self.ttl
        n = 0
        ids = self._ids
        while ids:
            first = next(iter(ids))
            if ids[first] >= cutoff:
                break
            del ids[first]
            n += 1
        return n

    def _trim(self) -> None:
        ids = self._ids
        while len(ids) > self.max_entries:
            del ids[next(iter(ids))]

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.commit()
            finally:
                os.close(self._fd)
                self._fd = None


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]
