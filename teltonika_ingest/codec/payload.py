"""The telemetry stream payload (contract.md §3): one compact JSON object per record.

```
{"device_id":"356307042441013","timestamp":"2019-06-10T10:04:46.000Z",
 "received_at":"...","codec":"8","priority":1,"longitude":25.2793217,...,
 "event_io_id":1,"generation_type":null,"attributes":{"21":3,"78":{"__bigint":"0"}}}
```

Attributes: key = IO id as a decimal string, in wire order (N1, N2, N4, N8, NX
groups, each in the order received); 1/2/4-byte values as JSON integers; 8-byte
values as ``{"__bigint": "<unsigned decimal>"}``; NX values as
``{"__buffer_b64": "<base64>"}``.

Then the data-quality flags of contract.md §8, in every payload (a record is never dropped
for them): ``gps_valid`` false when satellites are 0 or both coordinates are 0;
``time_valid`` false when the timestamp is before 2010-01-01 (timestamp 0 included) or more
than a window (default 10 minutes) after ``received_at``. Both timestamps are fixed-width
ISO 8601 strings with milliseconds, so ``time_valid`` is two string comparisons against
``MIN_VALID_TIMESTAMP`` and the *time limit* (``received_at`` + window, formatted the same
way: :func:`time_limit`), computed once per packet. Optionally an ``io`` object last (the
named values of ``teltonika_ingest.catalog``; the codec only places it).

This runs once per record, so :func:`format_timestamp` avoids ``datetime`` (about
5x slower): a per-day cache of ``YYYY-MM-DDT`` plus small lookup tables for the
time of day.
"""

from __future__ import annotations

from binascii import b2a_base64
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from .model import CODEC_16, AvlRecord

__all__ = [
    "DEFAULT_TIME_WINDOW_MS",
    "MIN_VALID_TIMESTAMP",
    "format_timestamp",
    "gps_valid",
    "payloads_and_flags",
    "payloads_from_parts",
    "record_attributes",
    "record_dict",
    "record_payload",
    "time_limit",
    "time_limit_ms",
    "time_valid",
]

#: time_valid is false before this instant (contract.md §8)
MIN_VALID_TIMESTAMP = "2010-01-01T00:00:00.000Z"
#: ... and more than this after received_at (--time-valid-window)
DEFAULT_TIME_WINDOW_MS = 600_000

_MS_PER_DAY = 86_400_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_HOUR_MINUTE = tuple(f"{h:02d}:{m:02d}:" for h in range(24) for m in range(60))
_SECOND = tuple(f"{s:02d}." for s in range(60))
_MILLI = tuple(f"{ms:03d}Z" for ms in range(1000))
_DAY_CACHE: dict[int, str] = {}
_DAY_CACHE_MAX = 4096
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_ONE_MS = timedelta(milliseconds=1)


def _day_prefix(days: int) -> str:
    # date.fromordinal raises ValueError outside years 1..9999: the timestamps a
    # 4-digit ISO 8601 year can express (the AVL decoder rejects the others).
    prefix = date.fromordinal(days + _EPOCH_ORDINAL).isoformat() + "T"
    if len(_DAY_CACHE) >= _DAY_CACHE_MAX:
        _DAY_CACHE.clear()
    _DAY_CACHE[days] = prefix
    return prefix


def format_timestamp(ms: int) -> str:
    """``ms`` since the epoch as ISO 8601 UTC with milliseconds: ``2019-06-10T10:04:46.000Z``.

    Raises ValueError outside years 0001..9999.
    """
    days, rest = divmod(ms, _MS_PER_DAY)
    prefix = _DAY_CACHE.get(days) or _day_prefix(days)
    seconds, milli = divmod(rest, 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{prefix}{_HOUR_MINUTE[minutes]}{_SECOND[seconds]}{_MILLI[milli]}"


_LIMIT_CACHE: dict[tuple[str, int], str] = {}


def time_limit(received_at: str, window_ms: int = DEFAULT_TIME_WINDOW_MS) -> str:
    """The latest timestamp still ``time_valid`` for records received at ``received_at``
    (ISO 8601 as :func:`format_timestamp` writes it), in the same format. Capped at the
    format's last instant (year 9999)."""
    key = (received_at, window_ms)
    limit = _LIMIT_CACHE.get(key)
    if limit is None:
        when = datetime.fromisoformat(received_at.replace("Z", "+00:00"))
        ms = (when - _EPOCH) // _ONE_MS + window_ms
        limit = format_timestamp(min(ms, _MAX_MS))
        if len(_LIMIT_CACHE) >= 64:
            _LIMIT_CACHE.clear()
        _LIMIT_CACHE[key] = limit
    return limit


def time_limit_ms(received_ms: int, window_ms: int = DEFAULT_TIME_WINDOW_MS) -> str:
    """:func:`time_limit` from the receive time in ms (what the publisher has): one
    :func:`format_timestamp`, no parsing."""
    return format_timestamp(min(received_ms + window_ms, _MAX_MS))


def gps_valid(record: AvlRecord) -> bool:
    """False when the fix has no satellites or sits at 0,0 (contract.md §8)."""
    return record.satellites != 0 and (record.longitude != 0 or record.latitude != 0)


def time_valid(timestamp: str, limit: str) -> bool:
    """``timestamp`` (ISO 8601 as written in the payload) not before 2010-01-01 and not
    after ``limit`` (:func:`time_limit`)."""
    return MIN_VALID_TIMESTAMP <= timestamp <= limit


def _b64(raw: bytes) -> str:
    return b2a_base64(raw, newline=False).decode("ascii")


def _attributes(record: AvlRecord) -> dict[int, Any]:
    """Attributes keyed by int IO id (orjson writes them as decimal strings)."""
    attributes: dict[int, Any] = {**record.io1, **record.io2, **record.io4}
    for io_id, value in record.io8.items():
        attributes[io_id] = {"__bigint": str(value)}
    for io_id, raw in record.iox.items():
        attributes[io_id] = {"__buffer_b64": _b64(raw)}
    return attributes


def record_attributes(record: AvlRecord) -> dict[str, Any]:
    """The payload's ``attributes`` object: decimal-string keys in wire order."""
    return {str(io_id): value for io_id, value in _attributes(record).items()}


def record_dict(
    record: AvlRecord,
    imei: str | None,
    codec: str,
    received_at: str,
    *,
    limit: str | None = None,
    io: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The payload as a dict with string keys (what ``orjson.loads(record_payload(...))``
    gives back)."""
    payload = _payload(record, imei, codec, received_at, limit, io)
    payload["attributes"] = record_attributes(record)
    return payload


def _payload(
    record: AvlRecord,
    imei: str | None,
    codec: str,
    received_at: str,
    limit: str | None,
    io: dict[str, Any] | None,
) -> dict[str, Any]:
    timestamp = format_timestamp(record.timestamp_ms)
    payload: dict[str, Any] = {
        "device_id": imei,
        "timestamp": timestamp,
        "received_at": received_at,
        "codec": codec,
        "priority": record.priority,
        "longitude": record.longitude / 1e7,
        "latitude": record.latitude / 1e7,
        "altitude": record.altitude,
        "angle": record.angle,
        "satellites": record.satellites,
        "speed": record.speed,
        "event_io_id": record.event_io_id,
        "generation_type": record.generation_type if codec == CODEC_16 else None,
        "attributes": _attributes(record),
        "gps_valid": gps_valid(record),
        "time_valid": time_valid(timestamp, limit or time_limit(received_at)),
    }
    if io is not None:
        payload["io"] = io
    return payload


_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS


def record_payload(
    record: AvlRecord,
    imei: str | None,
    codec: str,
    received_at: str,
    *,
    limit: str | None = None,
    io: dict[str, Any] | None = None,
) -> bytes:
    """Compact UTF-8 JSON of one record, exactly the shape of contract.md §3 and §8.

    ``imei`` None (unknown device) gives ``"device_id": null``. ``limit``: the packet's
    :func:`time_limit` (default: ``received_at`` + 10 minutes). ``io``: added last, as given.
    """
    return orjson.dumps(
        _payload(record, imei, codec, received_at, limit, io), option=_DUMPS_OPTIONS
    )


_TIME_VALID = b',"time_valid":true}'
_TIME_INVALID = b',"time_valid":false}'
_MIN_VALID = MIN_VALID_TIMESTAMP.encode("ascii")
_GPS_INVALID_END = b"false"


def payloads_and_flags(
    imei: str, received_at: str, parts: list[bytes], limit: str | None = None
) -> tuple[list[bytes], int, int]:
    """The compiled path's pieces (``AvlFrame.parts``: ``[ts0, tail0, ts1, tail1, ...]``)
    made whole: ``[ts0, payload0, ts1, payload1, ...]``, each payload byte-identical to
    :func:`record_payload` of the same record; and how many records have ``gps_valid``
    false and ``time_valid`` false. ``imei`` must be the 15 digits of a handshake (nothing
    to escape in JSON).

    A tail ends with ``"gps_valid":true`` or ``false`` (the compiled path decides it);
    ``time_valid`` and the closing brace are added here: a comparison of the timestamp with
    ``MIN_VALID_TIMESTAMP`` and ``limit``."""
    head = b'{"device_id":"' + imei.encode("ascii") + b'","timestamp":"'
    mid = b'","received_at":"' + received_at.encode("ascii") + b'"'
    upper = (limit or time_limit(received_at)).encode("ascii")
    low = _MIN_VALID
    join = b"".join
    out: list[bytes] = []
    append = out.append
    gps_bad = time_bad = 0
    for i in range(0, len(parts), 2):
        ts = parts[i]
        tail = parts[i + 1]
        append(ts)
        if low <= ts <= upper:
            append(join((head, ts, mid, tail, _TIME_VALID)))
        else:
            time_bad += 1
            append(join((head, ts, mid, tail, _TIME_INVALID)))
        if tail.endswith(_GPS_INVALID_END):
            gps_bad += 1
    return out, gps_bad, time_bad


def payloads_from_parts(
    imei: str, received_at: str, parts: list[bytes], limit: str | None = None
) -> list[bytes]:
    """:func:`payloads_and_flags` without the counts."""
    return payloads_and_flags(imei, received_at, parts, limit)[0]
