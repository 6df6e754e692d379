"""Live feed messages and close codes (contract.md §10). Pure: no Twisted, no I/O.

In (JSON text frames)::

    {"type":"subscribe","devices":["356307042441013", ...]}     or "devices":"*"
    {"type":"unsubscribe","devices":[...]}                      or "devices":"*"

Out::

    {"type":"subscribed","devices":[...]}     ("*" when subscribed to every visible device)
    {"type":"unsubscribed","devices":[...]}
    {"type":"position","device_id":...,"ts":...,...,"lag_ms":...}   (+ "snapshot":true)
    {"type":"error","reason":...}             (+ "devices":[...] when about devices)

Anything else inbound (binary frames, bad JSON, unknown type, a bad ``devices`` field) is a
protocol violation: the connection is closed with :data:`CLOSE_PROTOCOL_VIOLATION`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import attrs
import orjson

from teltonika_ingest.codec.payload import format_timestamp

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_VIOLATION",
    "CLOSE_SLOW_CONSUMER",
    "MAX_DEVICES_PER_REQUEST",
    "Position",
    "ProtocolViolation",
    "Request",
    "encode_error",
    "encode_position",
    "encode_subscribed",
    "encode_unsubscribed",
    "parse_request",
    "position_from_row",
]

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001  # the processor is shutting down
CLOSE_POLICY: Final = 1008  # bad or missing token, or the token was revoked
CLOSE_PROTOCOL_VIOLATION: Final = 4000
CLOSE_SLOW_CONSUMER: Final = 4001

#: one request may name at most this many devices (a larger fleet: subscribe to "*")
MAX_DEVICES_PER_REQUEST: Final = 10_000

_IMEI = re.compile(r"[0-9]{15}")


class ProtocolViolation(ValueError):
    """The client sent something the protocol does not allow; ``str()`` is the reason."""


@attrs.frozen
class Request:
    """``subscribe`` or ``unsubscribe``; ``devices`` None means ``"*"``."""

    type: str
    devices: frozenset[str] | None


def parse_request(text: str | bytes) -> Request:
    """One inbound text frame → :class:`Request`; raise :class:`ProtocolViolation`."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ProtocolViolation(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation("message is not a JSON object")
    kind = msg.get("type")
    if kind not in ("subscribe", "unsubscribe"):
        raise ProtocolViolation(f"unknown message type {kind!r}"[:120])
    devices = msg.get("devices")
    if devices == "*":
        return Request(kind, None)
    if not isinstance(devices, list):
        raise ProtocolViolation('"devices" must be "*" or a list of IMEIs')
    if len(devices) > MAX_DEVICES_PER_REQUEST:
        raise ProtocolViolation(
            f'{len(devices)} devices in one request (at most {MAX_DEVICES_PER_REQUEST}; use "*")'
        )
    for d in devices:
        if not isinstance(d, str) or not _IMEI.fullmatch(d):
            raise ProtocolViolation(f"not an IMEI (15 digits): {d!r}"[:120])
    return Request(kind, frozenset(devices))


# --------------------------------------------------------------------------- outbound


def _sorted(devices: Iterable[str] | None) -> list[str] | str:
    return "*" if devices is None else sorted(devices)


def encode_subscribed(devices: Iterable[str] | None) -> bytes:
    return orjson.dumps({"type": "subscribed", "devices": _sorted(devices)})


def encode_unsubscribed(devices: Iterable[str] | None) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "devices": _sorted(devices)})


def encode_error(reason: str, devices: Iterable[str] | None = None) -> bytes:
    msg: dict[str, Any] = {"type": "error", "reason": reason}
    if devices is not None:
        msg["devices"] = sorted(devices)
    return orjson.dumps(msg)


@attrs.frozen(slots=True)
class Position:
    """One device position, ready to send: ``fields`` are the message's JSON-ready fields
    (the stored record's, values decoded) without ``type`` and ``lag_ms``.

    ``ts_ms`` orders positions of one device (a snapshot never overwrites a newer live one);
    ``received_ms`` gives ``lag_ms``; ``entry_ms`` is the stream entry's time (the broadcast
    lag metric), None for a snapshot.
    """

    device_id: str
    ts_ms: int
    received_ms: int | None
    fields: Mapping[str, Any]
    entry_ms: int | None = None
    snapshot: bool = False


def _to_ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        return round(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    raise TypeError(f"not a time: {value!r}")


def _json_ready(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(round(value.timestamp() * 1000))
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    if isinstance(value, dict) and any(not isinstance(k, str) for k in value):
        return {str(k): _json_ready(v) for k, v in value.items()}  # IO ids as keys
    return value


#: fields of the processor's row that are not part of the message (or have a JSON form)
_ROW_ONLY = ("entry_id", "attributes_json", "io_json")


def _row_fields(row: Any) -> Mapping[str, Any]:
    if isinstance(row, Mapping):
        return row
    fields = attrs.asdict(row, recurse=False)
    # the processor's PositionRow carries the JSON text of attributes and io (8-byte values
    # as numbers, buffers as base64): embedded as they are, not serialised again
    if fields.get("attributes_json") is not None:
        fields["attributes"] = orjson.Fragment(fields["attributes_json"])
    if "io_json" in fields:
        io = fields["io_json"]
        fields["io"] = None if io is None else orjson.Fragment(io)
    for key in _ROW_ONLY:
        fields.pop(key, None)
    return fields


def position_from_row(row: Any, *, entry_ms: int | None = None, snapshot: bool = False) -> Position:
    """A typed position row → :class:`Position`. ``row`` is a mapping or an attrs instance
    such as the processor's ``PositionRow`` (``decode_entry``'s result). ``ts`` and
    ``received_at`` may be datetimes, ISO 8601 strings or epoch milliseconds; they are sent
    as ISO 8601 UTC with milliseconds."""
    row = _row_fields(row)
    device_id = str(row["device_id"])
    ts_ms = _to_ms(row["ts"])
    if ts_ms is None:
        raise ValueError("position without ts")
    received_ms = _to_ms(row.get("received_at"))
    fields: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("ts", "received_at"):
            ms = _to_ms(value)
            fields[key] = None if ms is None else format_timestamp(ms)
        elif key != "type":
            fields[key] = _json_ready(value)
    fields["device_id"] = device_id
    return Position(device_id, ts_ms, received_ms, fields, entry_ms, snapshot)


def _default(value: Any) -> Any:
    ready = _json_ready(value)
    if ready is value:
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")
    return ready


def encode_position(position: Position, now_ms: int) -> bytes:
    """The ``position`` message; ``lag_ms`` = now - ``received_at`` (null if unknown)."""
    msg: dict[str, Any] = {"type": "position"}
    msg.update(position.fields)
    if position.snapshot:
        msg["snapshot"] = True
    msg["lag_ms"] = None if position.received_ms is None else now_ms - position.received_ms
    return orjson.dumps(msg, default=_default)
