"""The telemetry payload (contract.md §3) and timestamp formatting."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika_ingest.codec import (
    MAX_TIMESTAMP_MS,
    AvlRecord,
    format_timestamp,
    record_attributes,
    record_dict,
    record_payload,
)

CONTRACT_KEYS = [
    "device_id",
    "timestamp",
    "received_at",
    "codec",
    "priority",
    "longitude",
    "latitude",
    "altitude",
    "angle",
    "satellites",
    "speed",
    "event_io_id",
    "generation_type",
    "attributes",
]

RECORD = AvlRecord(
    timestamp_ms=1560161086000,
    priority=1,
    longitude=252793217,
    latitude=546872135,
    altitude=112,
    angle=270,
    satellites=9,
    speed=42,
    event_io_id=1,
    io1={21: 3, 1: 1},
    io2={66: 24079},
    io8={78: 0},
    iox={385: b"\x01\x02\x03\x04"},
)


def test_contract_example():
    payload = record_payload(RECORD, "356307042441013", "8", "2026-11-22T10:00:00.123Z")
    assert payload == (
        b'{"device_id":"356307042441013","timestamp":"2019-06-10T10:04:46.000Z",'
        b'"received_at":"2026-11-22T10:00:00.123Z","codec":"8","priority":1,'
        b'"longitude":25.2793217,"latitude":54.6872135,"altitude":112,"angle":270,'
        b'"satellites":9,"speed":42,"event_io_id":1,"generation_type":null,'
        b'"attributes":{"21":3,"1":1,"66":24079,"78":{"__bigint":"0"},'
        b'"385":{"__buffer_b64":"AQIDBA=="}}}'
    )
    assert list(orjson.loads(payload)) == CONTRACT_KEYS


def test_generation_type_only_for_codec16():
    rec = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, generation_type=7)
    assert orjson.loads(record_payload(rec, "1", "16", "x"))["generation_type"] == 7
    assert orjson.loads(record_payload(rec, "1", "8E", "x"))["generation_type"] is None


def test_unknown_device_and_negative_coordinates():
    rec = AvlRecord(0, 2, -1800000000, -900000000, -50, 0, 0, 0, 0)
    payload = orjson.loads(record_payload(rec, None, "8", "x"))
    assert payload["device_id"] is None
    assert payload["longitude"] == -180.0 and payload["latitude"] == -90.0
    assert payload["altitude"] == -50
    assert payload["attributes"] == {}


def test_record_attributes_keys_and_order():
    attributes = record_attributes(RECORD)
    assert list(attributes) == ["21", "1", "66", "78", "385"]
    assert attributes["78"] == {"__bigint": "0"}
    assert attributes["385"] == {"__buffer_b64": "AQIDBA=="}


def test_record_dict_equals_parsed_payload():
    assert record_dict(RECORD, "1", "8E", "x") == orjson.loads(
        record_payload(RECORD, "1", "8E", "x")
    )


def test_big_values_stay_exact():
    rec = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, io4={1: 2**32 - 1}, io8={2: 2**64 - 1})
    payload = orjson.loads(record_payload(rec, "1", "8", "x"))
    assert payload["attributes"] == {"1": 4294967295, "2": {"__bigint": "18446744073709551615"}}


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1560161086000, "2019-06-10T10:04:46.000Z"),
        (951782400000 - 1, "2000-02-28T23:59:59.999Z"),
        (951868800000, "2000-03-01T00:00:00.000Z"),
        (MAX_TIMESTAMP_MS - 1, "9999-12-31T23:59:59.999Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ],
)
def test_format_timestamp(ms, text):
    assert format_timestamp(ms) == text


def test_format_timestamp_out_of_range():
    with pytest.raises(ValueError):
        format_timestamp(MAX_TIMESTAMP_MS)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.integers(-62135596800000, MAX_TIMESTAMP_MS - 1))
def test_format_timestamp_matches_datetime(ms):
    moment = EPOCH + timedelta(milliseconds=ms)
    expected = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert format_timestamp(ms) == expected


@given(
    io8=st.dictionaries(st.integers(0, 65535), st.integers(0, 2**64 - 1), max_size=5),
    iox=st.dictionaries(st.integers(0, 65535), st.binary(max_size=64), max_size=5),
    lon=st.integers(-(2**31), 2**31 - 1),
)
def test_payload_sentinels_round_trip(io8, iox, lon):
    iox = {k: v for k, v in iox.items() if k not in io8}
    rec = AvlRecord(0, 0, lon, 0, 0, 0, 0, 0, 0, io8=io8, iox=iox)
    attributes = orjson.loads(record_payload(rec, "1", "8E", "x"))["attributes"]
    assert {int(k): int(v["__bigint"]) for k, v in attributes.items() if "__bigint" in v} == io8
    assert {
        int(k): base64.b64decode(v["__buffer_b64"])
        for k, v in attributes.items()
        if "__buffer_b64" in v
    } == iox
    assert orjson.loads(record_payload(rec, "1", "8E", "x"))["longitude"] == lon / 1e7
