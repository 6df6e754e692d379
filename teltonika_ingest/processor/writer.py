"""The SQL of a batch write (runs on a :class:`~teltonika_ingest.processor.pg.PgWorker`).

One transaction per batch. Fast path: ``COPY`` the rows straight into ``positions``. If a
row is already there (a resend, a redelivery after a crash: the unique index on
``(device_id, ts)`` refuses the COPY), roll back and take the idempotent path: ``COPY`` into
a temporary staging table, ``INSERT INTO positions SELECT ... ON CONFLICT (device_id, ts) DO
NOTHING`` (the duplicates are the batch minus the rows inserted). Then move
``last_positions`` forward for the devices whose newest position is newer than the one
known (one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ... WHERE older``),
``COMMIT``. The caller acknowledges the entries only after this returns. Duplicates are
rare, so most batches are written once instead of twice (BENCHMARKS.md).

:func:`write_plain` is the one-INSERT-per-record implementation the benchmark compares it
with (bench/processor_drain.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import attrs
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

from teltonika_ingest.processor.decode import PositionRow

__all__ = ["COLUMNS", "LastPosition", "load_last_positions", "write_batch", "write_plain"]

COLUMNS: Final = (
    "device_id", "ts", "received_at", "codec", "priority", "longitude", "latitude",
    "altitude", "angle", "satellites", "speed", "event_io_id", "generation_type",
    "attributes", "io", "gps_valid", "time_valid",
)  # fmt: skip
LAST_COLUMNS: Final = (
    "device_id", "ts", "received_at", "codec", "longitude", "latitude", "altitude", "angle",
    "satellites", "speed", "gps_valid", "time_valid",
)  # fmt: skip

_COLS = ", ".join(COLUMNS)
_LAST = ", ".join(LAST_COLUMNS)
_STAGE = "positions_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE positions INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)
# binary COPY: PostgreSQL parses no timestamp or number text (about 1.5x the rows/s of
# text COPY here, BENCHMARKS.md); jsonb still arrives as JSON text behind its version byte
_COPY = f"COPY {_STAGE} ({_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_DIRECT = f"COPY positions ({_COLS}) FROM STDIN (FORMAT BINARY)"
_TYPES: Final = (
    "text", "timestamptz", "timestamptz", "text", "int2", "float8", "float8", "int4", "int4",
    "int4", "int4", "int4", "int2", "jsonb", "jsonb", "bool", "bool",
)  # fmt: skip
_MOVE = f"INSERT INTO positions ({_COLS}) SELECT {_COLS} FROM {_STAGE} ON CONFLICT DO NOTHING"
_LAST_TYPES = (
    "text", "timestamptz", "timestamptz", "text", "float8", "float8", "int4", "int4",
    "int4", "int4", "bool", "bool",
)  # fmt: skip
_UPSERT_LAST = (
    f"INSERT INTO last_positions ({_LAST}) SELECT * FROM unnest("
    + ", ".join(f"%s::{t}[]" for t in _LAST_TYPES)
    + ") ON CONFLICT (device_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in LAST_COLUMNS[1:])
    + ", updated_at = now() WHERE last_positions.ts < EXCLUDED.ts"
)
_INSERT_ONE = (
    f"INSERT INTO positions ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)

# connections whose staging table exists (it lives as long as the session)
_staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
# connections that know how to send JsonText
_adapted: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


class JsonText(str):
    """JSON already serialised (by the decoder): sent to a jsonb column as it is."""


class _JsonTextDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + obj.encode()  # jsonb binary format: version 1, then the text


def _adapt(conn: psycopg.Connection[Any]) -> None:
    if conn not in _adapted:
        info = conn.adapters.types["jsonb"]
        assert info is not None
        dumper = type("_JsonbDumper", (_JsonTextDumper,), {"oid": info.oid})
        conn.adapters.register_dumper(JsonText, dumper)
        _adapted.add(conn)


def _copy_rows(cur: psycopg.Cursor[Any], statement: str, rows: Sequence[PositionRow]) -> None:
    with cur.copy(statement) as copy:
        copy.set_types(list(_TYPES))
        write_row = copy.write_row
        for row in rows:
            write_row(_values(row))


@attrs.frozen(slots=True)
class LastPosition:
    """What the processor remembers of a device (and ``last_positions`` holds)."""

    ts: datetime
    longitude: float
    latitude: float
    speed: int

    @classmethod
    def of(cls, row: PositionRow) -> LastPosition:
        return cls(row.ts, row.longitude, row.latitude, row.speed)


def _values(row: PositionRow) -> tuple[Any, ...]:
    return (
        row.device_id, row.ts, row.received_at, row.codec, row.priority, row.longitude,
        row.latitude, row.altitude, row.angle, row.satellites, row.speed, row.event_io_id,
        row.generation_type, JsonText(row.attributes_json),
        None if row.io_json is None else JsonText(row.io_json), row.gps_valid, row.time_valid,
    )  # fmt: skip


def _advance_last(cur: psycopg.Cursor[Any], advance: Sequence[PositionRow]) -> None:
    if advance:
        columns = list(zip(*(_last_values(row) for row in advance), strict=True))
        cur.execute(_UPSERT_LAST, [list(c) for c in columns])


def _last_values(row: PositionRow) -> tuple[Any, ...]:
    return (
        row.device_id, row.ts, row.received_at, row.codec, row.longitude, row.latitude,
        row.altitude, row.angle, row.satellites, row.speed, row.gps_valid, row.time_valid,
    )  # fmt: skip


def write_batch(
    conn: psycopg.Connection[Any], rows: Sequence[PositionRow], advance: Sequence[PositionRow]
) -> int:
    """Write ``rows``, move ``last_positions`` forward to the rows in ``advance`` (each
    device's newest row, when newer than the known one); commit; return how many rows
    were new (the others were already there)."""
    _adapt(conn)
    with conn.cursor() as cur:
        try:
            _copy_rows(cur, _COPY_DIRECT, rows)
        except psycopg.errors.UniqueViolation:
            conn.rollback()
        else:
            _advance_last(cur, advance)
            conn.commit()
            return len(rows)
        if conn not in _staged:
            cur.execute(_CREATE_STAGE)
            conn.commit()
            _staged.add(conn)
        _copy_rows(cur, _COPY, rows)
        cur.execute(_MOVE)
        inserted = cur.rowcount
        _advance_last(cur, advance)
    conn.commit()
    return inserted


def write_plain(
    conn: psycopg.Connection[Any], rows: Sequence[PositionRow], advance: Sequence[PositionRow]
) -> int:
    """The same result as :func:`write_batch` with one INSERT per record (benchmark only)."""
    _adapt(conn)
    inserted = 0
    with conn.cursor() as cur:
        for row in rows:
            cur.execute(_INSERT_ONE, _values(row))
            inserted += cur.rowcount
        _advance_last(cur, advance)
    conn.commit()
    return inserted


def load_last_positions(
    conn: psycopg.Connection[Any], device_ids: Iterable[str]
) -> dict[str, LastPosition]:
    """The ``last_positions`` rows of these devices (one query for all of them)."""
    rows = conn.execute(
        "SELECT device_id, ts, longitude, latitude, speed FROM last_positions "
        "WHERE device_id = ANY(%s)",
        (list(device_ids),),
    ).fetchall()
    conn.commit()
    return {r[0]: LastPosition(r[1], r[2], r[3], r[4]) for r in rows}
