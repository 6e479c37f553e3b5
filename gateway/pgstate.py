"""Command and shadow state in the PostgreSQL sink's database (``--sink postgresql://...``).

The same rules and statements as :class:`gateway.cloudstate.CloudState` (its methods run
unchanged, on :class:`PgConn` instead of a sqlite3 connection) in PostgreSQL's dialect:
``?`` placeholders become ``%s``, and SQLite's ``BEGIN IMMEDIATE`` (one writer at a time)
becomes a transaction holding an advisory lock, so two CLIs, the sync task and several
ingest workers serialise their read-then-write steps exactly as they do on SQLite. The tables get PostgreSQL types
(``double precision`` times, ``bigint`` epochs and versions) and their own migrations.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from gateway.errors import SinkError
from gateway.migrations import migrate
from gateway.pgsink import _first_line, _redact

__all__ = ["PgConn"]

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


class PgConn:
    """The part of sqlite3.Connection that CloudState uses, over psycopg; a database error
    comes out as :class:`SinkError` (an OSError, as the callers of CloudState expect)."""

    def __init__(self, url: str) -> None:
        self.label = _redact(url)
        try:
            self.db = psycopg.connect(url, autocommit=True, application_name="edgeferry-cloudstate")
        except psycopg.Error as e:
            raise SinkError(f"cannot open the cloud state in {self.label}: {_first_line(e)}") from None
        self._migrate()

    def execute(self, query: str, params: Any = ()) -> psycopg.Cursor[Any]:
        try:
            if query.strip() == "BEGIN IMMEDIATE":
                self.db.execute("BEGIN")
                return self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            return self.db.execute(_QMARK.sub("%s", query.replace("%", "%%")), params)  # type: ignore[arg-type]
        except psycopg.Error as e:
            raise SinkError(f"cloud state in {self.label}: {_first_line(e)}") from None

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        migrate(self.execute, MIGRATIONS, self.label)
