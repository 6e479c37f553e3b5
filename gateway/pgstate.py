"""Command and shadow state in the PostgreSQL sink's database (``--sink postgresql://...``).

The same rules and statements as :class:`gateway.cloudstate.CloudState` (its methods run
unchanged) on a connection that speaks its dialect: ``?`` placeholders become ``%s``,
and SQLite's ``BEGIN IMMEDIATE`` (one writer at a time) becomes a transaction holding an
advisory lock, so two CLIs, the sync task and several ingest workers serialise their
read-then-write steps exactly as they do on SQLite. The tables get PostgreSQL types
(``double precision`` times, ``bigint`` epochs and versions) and their own migrations.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from gateway.cloudstate import CloudState
from gateway.errors import SinkError
from gateway.pgsink import _first_line, _redact

__all__ = ["PgCloudState"]

_LOCK = 0x6566_6364  # "efcd": one writer of command and shadow state at a time

MIGRATIONS = [
    # 1: commands and shadows
    """
    CREATE TABLE commands (
        id text PRIMARY KEY, node text NOT NULL, target text NOT NULL, name text NOT NULL,
        args text NOT NULL, ttl_ms bigint, created double precision NOT NULL,
        state text NOT NULL, by text, reply text, error text,
        delivered_at double precision, accepted_at double precision, finished_at double precision,
        site_time double precision, offers bigint NOT NULL DEFAULT 0, last_offer double precision);
    CREATE INDEX commands_node_state ON commands (node, state);
    CREATE TABLE shadows (
        node text NOT NULL, thing text NOT NULL,
        desired text, desired_version bigint NOT NULL DEFAULT 0, desired_at double precision,
        reported text, reported_epoch bigint NOT NULL DEFAULT 0,
        reported_version bigint NOT NULL DEFAULT 0, reported_at double precision,
        stale_dropped bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (node, thing))
    """,
]

_QMARK = re.compile(r"\?")


class _Conn:
    """The part of sqlite3.Connection that CloudState uses, over psycopg."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db

    def execute(self, query: str, params: Any = ()) -> psycopg.Cursor[Any]:
        q = query.strip()
        if q == "BEGIN IMMEDIATE":
            self.db.execute("BEGIN")
            return self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        return self.db.execute(_QMARK.sub("%s", query.replace("%", "%%")), params)  # type: ignore[arg-type]

    def close(self) -> None:
        self.db.close()


class PgCloudState(CloudState):
    """CloudState in PostgreSQL: same methods, same rules."""

    def __init__(self, url: str) -> None:  # noqa: D107 - no super().__init__: no file
        # shown in errors only
        self.path = _redact(url)  # type: ignore[assignment]
        try:
            db = psycopg.connect(url, autocommit=True, application_name="edgeferry-cloudstate")
            self._db = _Conn(db)  # type: ignore[assignment]
            self._migrate()
        except psycopg.Error as e:
            raise SinkError(f"cannot open the cloud state in {self.path}: {_first_line(e)}") from None

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS cloudstate_meta (key text PRIMARY KEY, value bigint)")
            row = db.execute("SELECT value FROM cloudstate_meta WHERE key='schema'").fetchone()
            have = row[0] if row else 0
            if have > len(MIGRATIONS):
                raise SinkError(f"{self.path}: cloud state schema {have} is newer than this edgeferry")
            for n in range(have, len(MIGRATIONS)):
                for stmt in MIGRATIONS[n].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            db.execute("INSERT INTO cloudstate_meta VALUES ('schema', ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = excluded.value", (len(MIGRATIONS),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def apply_records(self, rows: list[tuple[str, str, bytes]], now: float | None = None) -> int:
        try:
            return self._apply_records(rows, now)
        except psycopg.Error as e:
            # an OSError: ingest's writer retries the batch (the sink drops what it has)
            raise SinkError(f"cannot apply statuses to the cloud state in {self.path}: "
                            f"{_first_line(e)}") from None

    def close(self) -> None:
        self._db.close()
