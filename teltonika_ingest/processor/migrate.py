"""Versioned SQL migrations (``migrations/NNNN_name.sql``), applied under an advisory lock.

Every instance runs :func:`migrate` at start. A session-level ``pg_advisory_lock`` makes
instances that start together take turns: the first applies what is missing, the others
then find every version recorded in ``schema_migrations`` and apply nothing. Each file runs
in its own transaction together with the row that records it, so a failed migration leaves
no trace and is retried at the next start.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, Final

import attrs
import psycopg

__all__ = ["LOCK_KEY", "Migration", "available", "migrate"]

#: pg_advisory_lock key of the migrations (any fixed bigint; "tltk" in ASCII)
LOCK_KEY: Final = 0x746C746B
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped in the package, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def migrate(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[int]:
    """Apply the missing migrations; return the versions applied by this call."""
    todo = available() if migrations is None else migrations
    conn.commit()
    previous = conn.autocommit
    conn.autocommit = True
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
            done = {row[0] for row in rows}
            applied = []
            for migration in todo:
                if migration.version in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                applied.append(migration.version)
            return applied
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        conn.autocommit = previous


def ensure_partitions(conn: psycopg.Connection[Any], first_day: int, last_day: int) -> int:
    """Create the daily partitions first_day .. last_day (days from today); how many made."""
    row = conn.execute(
        "SELECT positions_ensure_partitions(%s, %s)", (first_day, last_day)
    ).fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def storage_kind(conn: psycopg.Connection[Any]) -> str:
    """``hypertable``, ``partitioned`` or ``table``: how positions is stored."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table"
        " WHERE partrelid = 'positions'::regclass),"
        " EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    ).fetchone()
    conn.commit()
    assert row is not None
    partitioned, timescale = row
    return "partitioned" if partitioned else "hypertable" if timescale else "table"
