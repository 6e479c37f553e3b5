"""A PostgreSQL database of the test's own on the machine's server (127.0.0.1:5432,
user postgres, or EDGEFERRY_TEST_PG), created for one test and dropped after it.

Tests that need it skip, saying why, only when no server answers or psycopg is missing
(``make test`` starts the machine's server when it is installed but stopped).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

ADMIN = os.environ.get("EDGEFERRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():  # type: ignore[no-untyped-def]
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[dev]')")
    try:
        return psycopg.connect(ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {ADMIN}: {str(e).strip().splitlines()[0]}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """``postgresql://.../ef_test_<random>``: a fresh database, dropped at teardown."""
    name = f"ef_test_{secrets.token_hex(6)}"
    with _admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    base = ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
