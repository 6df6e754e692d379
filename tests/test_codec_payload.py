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
from teltonika_ingest.codec.payload import (
    MIN_VALID_TIMESTAMP,
    payloads_and_flags,
    time_limit,
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
    "gps_valid",
    "time_valid",
]
RECEIVED = "2026-11-22T10:00:00.123Z"

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
    payload = record_payload(RECORD, "356307042441013", "8", RECEIVED)
    assert payload == (
        b'{"device_id":"356307042441013","timestamp":"2019-06-10T10:04:46.000Z",'
        b'"received_at":"2026-11-22T10:00:00.123Z","codec":"8","priority":1,'
        b'"longitude":25.2793217,"latitude":54.6872135,"altitude":112,"angle":270,'
        b'"satellites":9,"speed":42,"event_io_id":1,"generation_type":null,'
        b'"attributes":{"21":3,"1":1,"66":24079,"78":{"__bigint":"0"},'
        b'"385":{"__buffer_b64":"AQIDBA=="}},"gps_valid":true,"time_valid":true}'
    )
    assert list(orjson.loads(payload)) == CONTRACT_KEYS


def test_generation_type_only_for_codec16():
    rec = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, generation_type=7)
    assert orjson.loads(record_payload(rec, "1", "16", RECEIVED))["generation_type"] == 7
    assert orjson.loads(record_payload(rec, "1", "8E", RECEIVED))["generation_type"] is None


def test_unknown_device_and_negative_coordinates():
    rec = AvlRecord(0, 2, -1800000000, -900000000, -50, 0, 0, 0, 0)
    payload = orjson.loads(record_payload(rec, None, "8", RECEIVED))
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
    assert record_dict(RECORD, "1", "8E", RECEIVED) == orjson.loads(
        record_payload(RECORD, "1", "8E", RECEIVED)
    )


def test_big_values_stay_exact():
    rec = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, io4={1: 2**32 - 1}, io8={2: 2**64 - 1})
    payload = orjson.loads(record_payload(rec, "1", "8", RECEIVED))
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
    attributes = orjson.loads(record_payload(rec, "1", "8E", RECEIVED))["attributes"]
    assert {int(k): int(v["__bigint"]) for k, v in attributes.items() if "__bigint" in v} == io8
    assert {
        int(k): base64.b64decode(v["__buffer_b64"])
        for k, v in attributes.items()
        if "__buffer_b64" in v
    } == iox
    assert orjson.loads(record_payload(rec, "1", "8E", RECEIVED))["longitude"] == lon / 1e7


# --------------------------------------------------------------------------- quality flags


def flags(record: AvlRecord, received_at: str = RECEIVED, **kw) -> tuple[bool, bool]:
    payload = orjson.loads(record_payload(record, "1", "8E", received_at, **kw))
    return payload["gps_valid"], payload["time_valid"]


def at(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.mark.parametrize(
    ("satellites", "longitude", "latitude", "valid"),
    [
        (9, 252793217, 546872135, True),
        (0, 252793217, 546872135, False),  # no satellites
        (9, 0, 0, False),  # both coordinates 0
        (9, 0, 546872135, True),  # one coordinate 0 is a real place (the meridian)
        (9, 252793217, 0, True),  # the equator
        (1, -1, -1, True),
        (255, 0, 0, False),
    ],
)
def test_gps_valid_edges(satellites, longitude, latitude, valid):
    record = AvlRecord(at("2026-11-22T09:00:00.000Z"), 0, longitude, latitude, 0, 0,
                       satellites, 0, 0)  # fmt: skip
    assert flags(record) == (valid, True)


@pytest.mark.parametrize(
    ("timestamp", "valid"),
    [
        ("1970-01-01T00:00:00.000Z", False),  # timestamp 0
        ("2009-12-31T23:59:59.999Z", False),  # before 2010
        ("2010-01-01T00:00:00.000Z", True),  # the first valid instant
        ("2026-11-22T10:00:00.123Z", True),  # = received_at
        ("2026-11-22T10:10:00.123Z", True),  # exactly 10 minutes after received_at
        ("2026-11-22T10:10:00.124Z", False),  # 1 ms more
        ("2038-01-19T03:14:08.000Z", False),
        ("9999-12-31T23:59:59.999Z", False),
    ],
)
def test_time_valid_edges(timestamp, valid):
    record = AvlRecord(at(timestamp), 0, 252793217, 546872135, 0, 0, 9, 0, 0)
    assert flags(record) == (True, valid)


def test_time_window_is_a_parameter():
    record = AvlRecord(at("2026-11-22T10:00:30.123Z"), 0, 1, 1, 0, 0, 9, 0, 0)
    assert flags(record) == (True, True)
    assert flags(record, limit=time_limit(RECEIVED, 30_000)) == (True, True)
    assert flags(record, limit=time_limit(RECEIVED, 29_999)) == (True, False)
    assert time_limit(RECEIVED, 0) == RECEIVED
    assert time_limit("9999-12-31T23:50:00.000Z") == "9999-12-31T23:59:59.999Z"  # capped


def test_flags_never_drop_or_change_anything_else():
    bad = AvlRecord(0, 1, 0, 0, 0, 0, 0, 0, 0, io1={1: 1})
    payload = orjson.loads(record_payload(bad, "1", "8", RECEIVED))
    assert (payload["gps_valid"], payload["time_valid"]) == (False, False)
    assert payload["timestamp"] == "1970-01-01T00:00:00.000Z"
    assert payload["attributes"] == {"1": 1}


def test_io_object_goes_last_and_only_when_given():
    io = {"ignition": {"id": 239, "value": 1}}
    payload = orjson.loads(record_payload(RECORD, "1", "8", RECEIVED, io=io))
    assert list(payload)[-1] == "io" and payload["io"] == io
    assert "io" not in orjson.loads(record_payload(RECORD, "1", "8", RECEIVED))


def test_payloads_and_flags_counts():
    tail_ok = b',"codec":"8","attributes":{},"gps_valid":true'
    tail_bad = b',"codec":"8","attributes":{},"gps_valid":false'
    parts = [
        b"2026-11-22T10:00:00.000Z", tail_ok,
        MIN_VALID_TIMESTAMP.encode(), tail_bad,
        b"2009-12-31T23:59:59.999Z", tail_ok,
        b"2026-11-22T10:10:00.124Z", tail_bad,
    ]  # fmt: skip
    flat, gps_bad, time_bad = payloads_and_flags("356307042441013", RECEIVED, parts)
    assert (gps_bad, time_bad) == (2, 2)
    assert [orjson.loads(p)["time_valid"] for p in flat[1::2]] == [True, True, False, False]
    assert [orjson.loads(p)["gps_valid"] for p in flat[1::2]] == [True, False, True, False]


def test_time_limit_from_ms_equals_the_parsed_one():
    from teltonika_ingest.codec.payload import time_limit_ms

    for ms in (0, 1_795_341_600_123, 253_402_300_799_999 - 5):
        for window in (0, 1, 600_000):
            assert time_limit_ms(ms, window) == time_limit(format_timestamp(ms), window)
