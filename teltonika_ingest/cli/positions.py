"""``teltonika-ingest positions IMEI``: where a device was, from the processor's PostgreSQL.

Reads the ``positions`` table the processor writes (``twistd -n teltonika-processor``),
newest last. The database: ``--database-url``, else ``$DATABASE_URL``, else the
processor's config file (``./processor.conf``), else the local pipeline's embedded
PostgreSQL (``./var/postgres``, what ``make run`` starts).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

PROG = "teltonika-ingest positions"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "positions",
        help="print a device's stored positions (the processor's PostgreSQL)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("imei", help="the device's IMEI")
    parser.add_argument(
        "--since",
        help="ISO 8601 time (2026-11-22T10:00Z) or a duration back from now (90s, 10m, 2h, 1d)",
    )
    parser.add_argument("--until", help="ISO 8601 time; default: no upper bound")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many (1000), newest")
    parser.add_argument("--format", choices=("table", "json", "geojson"), default="table")
    parser.add_argument("--database-url", metavar="URL", help="default: $DATABASE_URL, ...")
    parser.add_argument("--config", metavar="FILE", help="the processor's config file")
    parser.set_defaults(handler=run)


def parse_when(text: str, now: datetime) -> datetime:
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time or a duration like 10m, got {text!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def database_url(args: argparse.Namespace) -> str:
    from twisted.python import usage

    from teltonika_ingest.config import ProcessorConfig

    url = args.database_url or os.environ.get("DATABASE_URL")
    if url:
        return str(url)
    argv = ["--config", args.config] if args.config is not None else []
    try:
        config = ProcessorConfig.from_args(argv)
    except usage.UsageError as e:
        raise ValueError(str(e)) from None
    if config.database_url:
        return config.database_url
    from teltonika_ingest.processor.embedded import EmbeddedPostgresService

    embedded = EmbeddedPostgresService(config.data_dir)
    if not os.path.exists(os.path.join(embedded.pgdata, ".s.PGSQL.5432")):
        raise ValueError(
            "no database: pass --database-url, set DATABASE_URL, or start the local pipeline "
            "(make run) whose embedded PostgreSQL is in ./var/postgres"
        )
    return embedded.conninfo


def run(args: argparse.Namespace) -> int:
    import psycopg

    now = datetime.now(UTC)
    try:
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
        url = database_url(args)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    sql = (
        "SELECT ts, received_at, longitude, latitude, altitude, angle, satellites, speed, "
        "codec, event_io_id, attributes, io, gps_valid, time_valid FROM positions "
        "WHERE device_id = %s AND (%s::timestamptz IS NULL OR ts >= %s) "
        "AND (%s::timestamptz IS NULL OR ts < %s) ORDER BY ts DESC LIMIT %s"
    )
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            rows = conn.execute(sql, (args.imei, since, since, until, until, args.limit)).fetchall()
    except psycopg.Error as e:
        text = str(e).strip().splitlines()
        print(f"{PROG}: database: {text[0] if text else type(e).__name__}", file=sys.stderr)
        return 1
    rows.reverse()
    write = sys.stdout.write
    if args.format == "table":
        write(f"{'ts':<24} {'longitude':>12} {'latitude':>12} {'alt':>5} {'angle':>5} "
              f"{'sats':>4} {'speed':>5}\n")  # fmt: skip
        for r in rows:
            write(f"{_iso(r[0]):<24} {r[2]:>12.7f} {r[3]:>12.7f} {r[4]:>5} {r[5]:>5} "
                  f"{r[6]:>4} {r[7]:>5}\n")  # fmt: skip
        print(f"{len(rows)} positions of {args.imei}", file=sys.stderr)
    elif args.format == "json":
        import orjson

        for r in rows:
            write(orjson.dumps(_as_dict(args.imei, r)).decode() + "\n")
    else:
        import orjson

        collection = {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [r[2], r[3]]},
                    "properties": _as_dict(args.imei, r),
                }
                for r in rows
            ],
        }
        write(orjson.dumps(collection).decode() + "\n")
    return 0


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_dict(imei: str, r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "device_id": imei, "timestamp": _iso(r[0]), "received_at": _iso(r[1]),
        "longitude": r[2], "latitude": r[3], "altitude": r[4], "angle": r[5],
        "satellites": r[6], "speed": r[7], "codec": r[8], "event_io_id": r[9],
        "attributes": r[10], "io": r[11], "gps_valid": r[12], "time_valid": r[13],
    }  # fmt: skip
