"""decode_entry: every vector's payload back into exact typed rows; every malformed field
refused with a reason."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from teltonika_ingest.codec import decode_avl_frame, record_payload
from teltonika_ingest.codec.payload import format_timestamp
from teltonika_ingest.processor.decode import DecodeError, decode_entry

from support import VECTORS, make_record

IMEI = "356307042441013"
RECEIVED = "2026-11-22T10:00:00.123Z"


def entry(payload: dict[str, Any] | bytes, **fields: Any) -> dict[str, Any]:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    base = {"imei": IMEI, "codec": "8E", "ts": "x", "payload": body}
    base.update(fields)
    return base


def good_payload(**overrides: Any) -> dict[str, Any]:
    payload = orjson.loads(record_payload(make_record(), IMEI, "8E", RECEIVED))
    payload.update(overrides)
    return payload


def iso(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["kind"] == "avl"], ids=lambda v: v["name"]
)
def test_every_vector_round_trips_exactly(vector: dict[str, Any]) -> None:
    packet = decode_avl_frame(bytes.fromhex(vector["hex"]))
    for i, record in enumerate(packet.records):
        payload = record_payload(record, IMEI, packet.codec, RECEIVED)
        row = decode_entry(
            f"1-{i}", {"imei": IMEI, "codec": packet.codec, "ts": "", "payload": payload}
        )
        assert row.entry_id == f"1-{i}"
        assert row.device_id == IMEI and row.codec == packet.codec
        assert row.ts == iso(record.timestamp_ms)
        assert row.received_at == datetime(2026, 11, 22, 10, 0, 0, 123000, UTC)
        assert row.longitude == record.longitude / 1e7 and row.latitude == record.latitude / 1e7
        assert (row.priority, row.altitude, row.angle, row.satellites, row.speed) == (
            record.priority, record.altitude, record.angle, record.satellites, record.speed,
        )  # fmt: skip
        assert row.event_io_id == record.event_io_id
        assert row.generation_type == (record.generation_type if packet.codec == "16" else None)
        expected = {**record.io1, **record.io2, **record.io4, **record.io8, **record.iox}
        assert dict(row.attributes) == expected


def test_sentinels_reversed_exactly_and_stored_as_numbers_and_base64() -> None:
    record = make_record(
        io8={78: 2**64 - 1, 79: 0}, iox={385: b"\x01\x02\x03\x04", 386: b""},
        longitude=-252793217, latitude=-546872135,
    )  # fmt: skip
    payload = record_payload(record, IMEI, "8E", RECEIVED)
    row = decode_entry("1-0", entry(payload))
    assert row.attributes[78] == 18446744073709551615 and type(row.attributes[78]) is int
    assert row.attributes[79] == 0
    assert row.attributes[385] == b"\x01\x02\x03\x04" and row.attributes[386] == b""
    assert row.longitude == -25.2793217 and row.latitude == -54.6872135
    stored = orjson.loads(row.attributes_json)
    assert stored["78"] == 18446744073709551615
    assert base64.b64decode(stored["385"]) == b"\x01\x02\x03\x04"
    # the ingest writes the data-quality flags into every payload (contract.md section 8)
    assert row.io_json is None and row.gps_valid is True and row.time_valid is True
    # a payload written before the flags existed: NULL, not a guess
    older = orjson.loads(payload)
    del older["gps_valid"], older["time_valid"]
    row = decode_entry("1-0", entry(orjson.dumps(older)))
    assert row.gps_valid is None and row.time_valid is None


def test_quality_flags_and_io_are_carried_when_present() -> None:
    io = {"external_voltage": {"value": 12.52, "unit": "V"}}
    row = decode_entry("1-0", entry(good_payload(gps_valid=False, time_valid=True, io=io)))
    assert row.gps_valid is False and row.time_valid is True
    assert orjson.loads(row.io_json or "") == io


def test_bytes_fields_as_redis_may_return_them() -> None:
    payload = record_payload(make_record(), IMEI, "8E", RECEIVED)
    fields = {"imei": IMEI.encode(), "codec": b"8E", "ts": b"", "payload": payload}
    row = decode_entry("1-0", fields)
    assert row.device_id == IMEI


def test_timestamp_precision_and_range() -> None:
    for ms in (0, 1_560_161_086_000, 253402300799999):
        row = decode_entry("1-0", entry(good_payload(timestamp=format_timestamp(ms))))
        assert row.ts == iso(ms)


BAD: list[tuple[str, dict[str, Any] | bytes, dict[str, Any], str]] = [
    ("missing payload field", {}, {"payload": None}, "field 'payload' missing"),
    ("not JSON", b"{nope", {}, "payload is not JSON"),
    ("JSON but a list", b"[1]", {}, "payload is not a JSON object"),
    ("unknown codec", good_payload(codec="12"), {"codec": "12"}, "unknown codec"),
    ("codec mismatch", good_payload(codec="8"), {}, "payload codec differs"),
    ("imei mismatch", good_payload(device_id="111111111111111"), {}, "device_id differs"),
    ("null device", good_payload(device_id=None), {}, "device_id missing"),
    (
        "control char",
        good_payload(device_id="3563\x00"),
        {"imei": "3563\x00"},
        "control characters",
    ),
    ("bad timestamp", good_payload(timestamp="2019-06-10 10:04:46"), {}, "timestamp is not"),
    ("no Z", good_payload(timestamp="2019-06-10T10:04:46.000+01:00"), {}, "timestamp is not"),
    ("bad received_at", good_payload(received_at=5), {}, "received_at is not"),
    ("priority text", good_payload(priority="1"), {}, "priority is not an integer"),
    ("priority bool", good_payload(priority=True), {}, "priority is not an integer"),
    ("priority range", good_payload(priority=256), {}, "priority 256 is out of range"),
    ("altitude range", good_payload(altitude=2**31), {}, "altitude"),
    ("longitude text", good_payload(longitude="25.1"), {}, "longitude is not a number"),
    ("generation type", good_payload(generation_type=300), {}, "generation_type"),
    ("attributes list", good_payload(attributes=[]), {}, "attributes is not an object"),
    ("attribute key", good_payload(attributes={"x": 1}), {}, "is not an IO id"),
    ("attribute key range", good_payload(attributes={"70000": 1}), {}, "is not an IO id"),
    ("attribute negative", good_payload(attributes={"1": -1}), {}, "out of range"),
    ("attribute above u32", good_payload(attributes={"1": 2**32}), {}, "out of range"),
    ("attribute float", good_payload(attributes={"1": 1.5}), {}, "neither an integer"),
    (
        "bigint above u64",
        good_payload(attributes={"1": {"__bigint": str(2**64)}}),
        {},
        "above 2^64-1",
    ),
    ("bigint negative", good_payload(attributes={"1": {"__bigint": "-1"}}), {}, "unsigned decimal"),
    ("bigint number", good_payload(attributes={"1": {"__bigint": 5}}), {}, "unsigned decimal"),
    ("buffer not base64", good_payload(attributes={"1": {"__buffer_b64": "!!"}}), {}, "not base64"),
    (
        "unknown sentinel",
        good_payload(attributes={"1": {"__float": "1"}}),
        {},
        "neither an integer",
    ),
    ("io list", good_payload(io=[1]), {}, "io is not an object"),
    ("io NUL", good_payload(io={"a": "x\u0000"}), {}, "NUL"),
    ("flag text", good_payload(gps_valid="yes"), {}, "gps_valid is not a boolean"),
    ("payload not UTF-8 imei", good_payload(), {"imei": b"\xff"}, "not UTF-8"),
]


@pytest.mark.parametrize(
    ("payload", "fields", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_malformed_entries_are_refused_with_a_reason(
    payload: dict[str, Any] | bytes, fields: dict[str, Any], reason: str
) -> None:
    fields = dict(fields)
    base = entry(payload, **{k: v for k, v in fields.items() if v is not None})
    for k, v in fields.items():
        if v is None:
            del base[k]
    with pytest.raises(DecodeError, match=reason.replace("^", r"\^")):
        decode_entry("1-0", base)


def test_dead_letter_fields_give_back_the_original_entry() -> None:
    from teltonika_ingest.processor.cli import original_fields
    from teltonika_ingest.processor.consumer import original_as_letter_fields

    original = {"imei": IMEI, "codec": "8E", "ts": "x", "payload": "{", "error": "theirs"}
    flat = original_as_letter_fields(original)
    assert "original:error" in flat and flat.count("error") == 0
    letter = {"entry_id": "1-0", "error": "decode: payload is not JSON", "deliveries": "5"}
    letter.update(zip(flat[0::2], flat[1::2], strict=True))
    assert original_fields(letter) == original


def test_parsed_timestamps_are_cached_bounded_and_errors_never_are() -> None:
    from teltonika_ingest.processor import decode

    decode._TIMESTAMPS.clear()
    first = decode.parse_timestamp("2019-06-10T10:04:46.120Z", "ts")
    assert first == datetime(2019, 6, 10, 10, 4, 46, 120000, tzinfo=UTC)
    assert decode.parse_timestamp("2019-06-10T10:04:46.120Z", "ts") is first  # from the cache
    for _ in range(2):  # a bad one is refused every time, never remembered
        with pytest.raises(DecodeError, match="not an ISO 8601"):
            decode.parse_timestamp("2019-06-10 10:04:46", "ts")
    assert "2019-06-10 10:04:46" not in decode._TIMESTAMPS
    for ms in range(decode._TIMESTAMPS_MAX + 10):
        text = format_timestamp(1_560_000_000_000 + ms)
        assert decode.parse_timestamp(text, "ts") == iso(1_560_000_000_000 + ms)
    assert len(decode._TIMESTAMPS) <= decode._TIMESTAMPS_MAX
