"""Numbered migrations of the cloud state's schema, one runner for SQLite and PostgreSQL.

``execute`` is a connection's execute (sqlite3's, or gateway.pgstate.PgConn's, which
takes the same ``?`` placeholders and ``BEGIN IMMEDIATE``); ``migrations`` is the list of
scripts, the schema's version being how many of them ran. The whole step is one
transaction: a failure leaves the schema as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import SinkError

__all__ = ["migrate"]


def migrate(execute: Callable[..., Any], migrations: Sequence[str], label: str) -> None:
    execute("BEGIN IMMEDIATE")
    try:
        execute("CREATE TABLE IF NOT EXISTS cloudstate_meta (key TEXT PRIMARY KEY, value BIGINT)")
        row = execute("SELECT value FROM cloudstate_meta WHERE key='schema'").fetchone()
        have = row[0] if row else 0
        if have > len(migrations):
            raise SinkError(f"{label}: cloud state schema {have} is newer than this edgeferry")
        for script in migrations[have:]:
            for stmt in script.split(";"):
                if stmt.strip():
                    execute(stmt)
        execute("INSERT INTO cloudstate_meta VALUES ('schema', ?) ON CONFLICT (key)"
                " DO UPDATE SET value = excluded.value", (len(migrations),))
        execute("COMMIT")
    except BaseException:
        execute("ROLLBACK")
        raise
