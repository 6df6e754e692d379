"""The SQL of a batch write (runs on a :class:`~teltonika_ingest.processor.pg.PgWorker`).

Fast path, one transaction per batch: ``COPY`` the rows into a temporary staging table,
``INSERT INTO positions SELECT ... ON CONFLICT (device_id, ts) DO NOTHING`` (a resend is a
no-op; its count is the batch minus the rows inserted), move ``last_positions`` forward for
the devices whose newest position is newer than the one known, ``COMMIT``. The caller
acknowledges the entries only after this returns.

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
_COPY = f"COPY {_STAGE} ({_COLS}) FROM STDIN"
_MOVE = f"INSERT INTO positions ({_COLS}) SELECT {_COLS} FROM {_STAGE} ON CONFLICT DO NOTHING"
_UPSERT_LAST = (
    f"INSERT INTO last_positions ({_LAST}) "
    f"SELECT DISTINCT ON (device_id) {_LAST} FROM {{source}} WHERE device_id = ANY(%s) "
    "ORDER BY device_id, ts DESC "
    "ON CONFLICT (device_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in LAST_COLUMNS[1:])
    + ", updated_at = now() WHERE last_positions.ts < EXCLUDED.ts"
)
_INSERT_ONE = (
    f"INSERT INTO positions ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)

# connections whose staging table exists (it lives as long as the session)
_staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


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
        row.generation_type, row.attributes_json, row.io_json, row.gps_valid, row.time_valid,
    )  # fmt: skip


def write_batch(
    conn: psycopg.Connection[Any], rows: Sequence[PositionRow], advance: Sequence[str]
) -> int:
    """Write ``rows`` and move ``last_positions`` forward for the devices in ``advance``;
    commit; return how many rows were new (the others were already there)."""
    if conn not in _staged:
        conn.execute(_CREATE_STAGE)
        conn.commit()
        _staged.add(conn)
    with conn.cursor() as cur:
        with cur.copy(_COPY) as copy:
            write_row = copy.write_row
            for row in rows:
                write_row(_values(row))
        cur.execute(_MOVE)
        inserted = cur.rowcount
        if advance:
            cur.execute(_UPSERT_LAST.format(source=_STAGE), (list(advance),))
    conn.commit()
    return inserted


def write_plain(
    conn: psycopg.Connection[Any], rows: Sequence[PositionRow], advance: Sequence[str]
) -> int:
    """The same result as :func:`write_batch` with one INSERT per record (benchmark only)."""
    inserted = 0
    with conn.cursor() as cur:
        for row in rows:
            cur.execute(_INSERT_ONE, _values(row))
            inserted += cur.rowcount
        if advance:
            cur.execute(_UPSERT_LAST.format(source="positions"), (list(advance),))
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
