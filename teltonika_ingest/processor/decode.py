"""Stream entry -> typed position row (pure: no Twisted, no Redis, no database, no logging).

A telemetry stream entry (contract.md section 3) has the fields ``imei``, ``codec``, ``ts``
and ``payload`` (compact JSON). :func:`decode_entry` checks every field the ``positions``
table needs and reverses the payload's two sentinels:

* ``{"__bigint": "<unsigned decimal>"}`` -> an exact ``int`` (0 .. 2**64 - 1);
* ``{"__buffer_b64": "<base64>"}`` -> ``bytes``.

Anything else wrong raises :class:`DecodeError` with a short reason; the consumer counts it,
leaves the entry pending and dead-letters it after ``--dlq-attempts`` deliveries.

The row also carries the text forms the writer sends to PostgreSQL, so a record is
serialised once: ``attributes_json`` (8-byte values as JSON numbers, exact in ``jsonb``,
buffers as base64 strings) and ``io_json``.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import orjson

__all__ = ["CODECS", "DecodeError", "PositionRow", "decode_entry", "parse_timestamp"]

CODECS: Final = frozenset({"8", "8E", "16"})
U64_MAX: Final = 2**64 - 1
U32_MAX: Final = 2**32 - 1
I32_MIN: Final = -(2**31)
I32_MAX: Final = 2**31 - 1
MAX_DEVICE_ID: Final = 64

_REQUIRED_FIELDS: Final = ("imei", "codec", "ts", "payload")


class DecodeError(ValueError):
    """The entry cannot become a row; ``str(error)`` is a short reason."""


@attrs.frozen(slots=True)
class PositionRow:
    """One ``positions`` row, plus the stream entry it came from."""

    entry_id: str
    device_id: str
    ts: datetime
    received_at: datetime
    codec: str
    priority: int
    longitude: float
    latitude: float
    altitude: int
    angle: int
    satellites: int
    speed: int
    event_io_id: int
    generation_type: int | None
    #: IO id -> exact value (sentinels reversed: 8-byte ints, buffers as bytes)
    attributes: Mapping[int, int | bytes]
    attributes_json: str
    io_json: str | None
    gps_valid: bool | None
    time_valid: bool | None


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{what} is not UTF-8") from None
    if isinstance(value, str):
        return value
    raise DecodeError(f"{what} is not text")


# timestamp text -> parsed (datetimes are immutable): the records of a packet share their
# received_at, and a batch repeats times across devices; cleared when full (bounded)
_TIMESTAMPS: dict[str, datetime] = {}
_TIMESTAMPS_MAX = 4096


def parse_timestamp(value: Any, what: str) -> datetime:
    """ISO 8601 UTC (``2019-06-10T10:04:46.000Z``) -> an aware ``datetime`` in UTC."""
    if type(value) is str:
        cached = _TIMESTAMPS.get(value)
        if cached is not None:
            return cached
    parsed = _parse_timestamp(value, what)
    if len(_TIMESTAMPS) >= _TIMESTAMPS_MAX:
        _TIMESTAMPS.clear()
    _TIMESTAMPS[value] = parsed
    return parsed


def _parse_timestamp(value: Any, what: str) -> datetime:
    if not isinstance(value, str) or not value.endswith("Z") or "T" not in value:
        raise DecodeError(f"{what} is not an ISO 8601 UTC timestamp ending in Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DecodeError(f"{what} is not an ISO 8601 UTC timestamp ending in Z") from None
    return parsed.astimezone(UTC)


def _int(payload: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = payload.get(key)
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise DecodeError(f"{key} is not an integer")
    if not lo <= value <= hi:
        raise DecodeError(f"{key} {value} is out of range {lo}..{hi}")
    return value


def _coordinate(payload: Mapping[str, Any], key: str) -> float:
    value = payload.get(key)
    if not (type(value) is int or (type(value) is float and math.isfinite(value))):
        raise DecodeError(f"{key} is not a number")
    return float(value)


def _flag(payload: Mapping[str, Any], key: str) -> bool | None:
    value = payload.get(key)
    if value is None or type(value) is bool:
        return value
    raise DecodeError(f"{key} is not a boolean")


# IO id text -> int for every valid id seen (at most 65536 entries): the per-key check
# runs once per id, not once per record
_IO_IDS: dict[str, int] = {}


def _io_id(key: str) -> int:
    io_id = _IO_IDS.get(key)
    if io_id is None:
        if not (key.isdigit() and key.isascii() and len(key) <= 5 and int(key) <= 65535):
            raise DecodeError(f"attribute key {key[:20]!r} is not an IO id 0..65535")
        io_id = _IO_IDS[key] = int(key)
    return io_id


def _sentinel(key: str, value: Any) -> tuple[int | bytes, int | str]:
    """(exact value, stored value) of a sentinel object."""
    if isinstance(value, dict) and len(value) == 1 and "__bigint" in value:
        digits = value["__bigint"]
        if not (isinstance(digits, str) and digits.isdigit() and digits.isascii()):
            raise DecodeError(f"attribute {key}: __bigint is not an unsigned decimal")
        number = int(digits)
        if number > U64_MAX:
            raise DecodeError(f"attribute {key}: __bigint {digits[:30]} is above 2^64-1")
        return number, number
    if isinstance(value, dict) and len(value) == 1 and "__buffer_b64" in value:
        text = value["__buffer_b64"]
        if not isinstance(text, str):
            raise DecodeError(f"attribute {key}: __buffer_b64 is not text")
        try:
            return binascii.a2b_base64(text, strict_mode=True), text
        except (binascii.Error, ValueError):
            raise DecodeError(f"attribute {key}: __buffer_b64 is not base64") from None
    raise DecodeError(f"attribute {key} is neither an integer nor a known sentinel")


def _attributes(raw: Any) -> tuple[dict[int, int | bytes], str]:
    """(exact values by IO id, the jsonb text: 8-byte values as numbers, buffers as
    base64 strings)."""
    if type(raw) is not dict:
        raise DecodeError("attributes is not an object")
    exact: dict[int, int | bytes] = {}
    stored: dict[str, Any] = raw  # copied only when a sentinel must be replaced
    for key, value in raw.items():
        io_id = _IO_IDS.get(key)
        if io_id is None:
            io_id = _io_id(key)
        if type(value) is int:
            if value < 0 or value > U32_MAX:
                raise DecodeError(f"attribute {key} value {value} is out of range 0..2^32-1")
            exact[io_id] = value
        else:
            exact[io_id], plain = _sentinel(key, value)
            if stored is raw:
                stored = dict(raw)
            stored[key] = plain
    return exact, orjson.dumps(stored).decode()


def _io_json(io: Any) -> str | None:
    if io is None:
        return None
    if not isinstance(io, dict):
        raise DecodeError("io is not an object")
    text = orjson.dumps(io).decode()
    if "\\u0000" in text:  # jsonb cannot store NUL in a string
        raise DecodeError("io contains a NUL character")
    return text


def decode_entry(entry_id: str, fields: Mapping[str, Any]) -> PositionRow:
    """One stream entry (its field map, values ``str`` or ``bytes``) -> a row.

    Raises :class:`DecodeError` when a field is missing or malformed.
    """
    for name in _REQUIRED_FIELDS:
        if name not in fields:
            raise DecodeError(f"field {name!r} missing")
    imei = _text(fields["imei"], "field imei")
    codec = _text(fields["codec"], "field codec")
    if codec not in CODECS:
        raise DecodeError(f"unknown codec {codec[:10]!r}")
    try:
        payload = orjson.loads(fields["payload"])
    except orjson.JSONDecodeError:
        raise DecodeError("payload is not JSON") from None
    if not isinstance(payload, dict):
        raise DecodeError("payload is not a JSON object")

    device_id = payload.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise DecodeError("device_id missing or not text")
    if len(device_id) > MAX_DEVICE_ID or not device_id.isprintable():
        raise DecodeError("device_id is too long or has control characters")
    if device_id != imei:
        raise DecodeError("device_id differs from the entry's imei field")
    if payload.get("codec") != codec:
        raise DecodeError("payload codec differs from the entry's codec field")

    generation_type = payload.get("generation_type")
    if generation_type is not None:
        generation_type = _int(payload, "generation_type", 0, 255)
    attributes, attributes_json = _attributes(payload.get("attributes"))
    return PositionRow(
        entry_id=entry_id,
        device_id=device_id,
        ts=parse_timestamp(payload.get("timestamp"), "timestamp"),
        received_at=parse_timestamp(payload.get("received_at"), "received_at"),
        codec=codec,
        priority=_int(payload, "priority", 0, 255),
        longitude=_coordinate(payload, "longitude"),
        latitude=_coordinate(payload, "latitude"),
        altitude=_int(payload, "altitude", I32_MIN, I32_MAX),
        angle=_int(payload, "angle", I32_MIN, I32_MAX),
        satellites=_int(payload, "satellites", I32_MIN, I32_MAX),
        speed=_int(payload, "speed", I32_MIN, I32_MAX),
        event_io_id=_int(payload, "event_io_id", I32_MIN, I32_MAX),
        generation_type=generation_type,
        attributes=attributes,
        attributes_json=attributes_json,
        io_json=_io_json(payload.get("io")),
        gps_valid=_flag(payload, "gps_valid"),
        time_valid=_flag(payload, "time_valid"),
    )
