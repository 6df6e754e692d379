"""The compiled hot path (codec/_fastavl.c) against the pure-Python decoder and payload.

The one property that matters: whenever ``payload_parts`` succeeds, the Python decoder
succeeds too and gives byte-identical payloads; when it refuses (ValueError), the Python
decoder decides. And it must not refuse the ordinary packets, or it would be dead weight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika_ingest.codec import (
    AvlFrame,
    AvlPacket,
    CodecError,
    Framer,
    accel,
    decode_avl_data,
    encode_avl_data,
    format_timestamp,
    record_payload,
    wrap_frame,
)
from teltonika_ingest.codec.payload import payloads_and_flags, payloads_from_parts

from test_codec_properties import RELAXED, avl_packets, avl_records, damaged

IMEI = "356307042441013"
RECEIVED_AT = "2026-11-22T10:00:00.123Z"
VECTORS = json.loads((Path(__file__).parent / "data" / "teltonika-spec-vectors.json").read_text())
AVL_VECTORS = [v for v in VECTORS["vectors"] if v["kind"] == "avl"]


def fast(data: bytes) -> tuple[str, int, list[bytes]]:
    assert accel.payload_parts is not None
    return accel.payload_parts(data)


def python_side(data: bytes) -> tuple[str, int, list[bytes]]:
    """What the pure-Python path publishes for this data field: codec, count, [ts, payload]*."""
    packet = decode_avl_data(data)
    flat: list[bytes] = []
    for record in packet.records:
        flat.append(format_timestamp(record.timestamp_ms).encode())
        flat.append(record_payload(record, IMEI, packet.codec, RECEIVED_AT))
    return packet.codec, len(packet.records), flat


def check_agrees(data: bytes) -> bool:
    """True if the compiled path took it (and then agrees exactly), False if it refused."""
    try:
        codec, count, parts = fast(data)
    except ValueError:
        return False
    assert python_side(data) == (codec, count, payloads_from_parts(IMEI, RECEIVED_AT, parts))
    return True


def handled(packet: AvlPacket) -> bool:
    """The compiled path takes every packet except coordinates in (-1e-4, 1e-4) other than
    0 (orjson writes those without an exponent) and records whose IO ids repeat."""
    for r in packet.records:
        for coordinate in (r.longitude, r.latitude):
            if coordinate and -1000 < coordinate < 1000:
                return False
        groups = [r.io1, r.io2, r.io4, r.io8, r.iox]
        if sum(map(len, groups)) != len(set().union(*groups)):
            return False
    return True


def test_the_extension_is_built_and_on() -> None:
    # `make test` installs with a C compiler: a silent fallback here would hide a build break.
    assert accel.payload_parts is not None, accel.compiled_path_status()
    assert accel.compiled_path_status() == "on"


@pytest.mark.parametrize("vector", AVL_VECTORS, ids=[v["name"] for v in AVL_VECTORS])
def test_every_vector_takes_the_compiled_path_and_agrees(vector) -> None:
    data = bytes.fromhex(vector["hex"])[8:-4]
    assert check_agrees(data)


@RELAXED
@given(avl_packets())
def test_generated_packets_agree(packet) -> None:
    assert check_agrees(encode_avl_data(packet)) == handled(packet)


@RELAXED
@given(st.sampled_from(["8", "8E", "16"]).flatmap(lambda c: avl_records(c).map(lambda r: (c, r))))
def test_edge_values_agree(codec_record) -> None:
    codec, record = codec_record
    packet = AvlPacket(codec, (record,))
    assert check_agrees(encode_avl_data(packet)) == handled(packet)


@pytest.mark.parametrize(
    ("longitude", "handled_by_c"),
    [(0, True), (1, False), (-999, False), (1000, True), (-1000, True), (2**31 - 1, True),
     (-(2**31), True), (253_000_000, True)],
)  # fmt: skip
def test_coordinates(longitude: int, handled_by_c: bool) -> None:
    from support import make_record

    packet = AvlPacket("8E", (make_record(0, longitude=longitude, latitude=longitude),))
    assert check_agrees(encode_avl_data(packet)) is handled_by_c


def test_repeated_io_id_is_left_to_python() -> None:
    from support import make_record

    # the same id in two groups: legal for the decoder, the payload shows the wider value
    record = make_record(0, io1={21: 3}, io2={21: 7}, io4={}, io8={})
    data = encode_avl_data(AvlPacket("8E", (record,)))
    assert not check_agrees(data)
    assert b'"21":7' in python_side(data)[2][1]


@RELAXED
@given(avl_packets(max_records=3), st.data())
def test_damaged_data_fields_never_succeed_where_python_fails(packet, data) -> None:
    mutated = damaged(encode_avl_data(packet), data)
    try:
        fast(mutated)
    except ValueError:
        return
    try:
        decode_avl_data(mutated)
    except CodecError as exc:  # pragma: no cover - the failure this test exists for
        raise AssertionError(f"compiled path accepted what Python refuses: {exc}") from exc
    assert check_agrees(mutated)


@RELAXED
@given(st.binary(max_size=400), st.sampled_from([b"\x08", b"\x8e", b"\x10"]))
def test_random_bytes(garbage: bytes, codec_id: bytes) -> None:
    data = codec_id + garbage
    try:
        fast(data)
    except ValueError:
        return
    assert check_agrees(data)


def test_not_bytes_is_a_type_error() -> None:
    assert accel.payload_parts is not None
    with pytest.raises(TypeError):
        accel.payload_parts(bytearray(b"\x08\x01\x01"))  # type: ignore[arg-type]


def test_framer_builds_lazy_frames_equal_to_decoded_ones() -> None:
    from support import make_record

    packet = AvlPacket("8E", tuple(make_record(i) for i in range(3)))
    frame = wrap_frame(encode_avl_data(packet))
    framer = Framer(expect_handshake=False)
    framer.feed(frame)
    event = framer.next_event()
    assert isinstance(event, AvlFrame)
    assert event.parts is not None  # the compiled path made it
    assert (event.codec, event.record_count) == ("8E", 3)
    assert event == AvlFrame(packet, frame)
    assert event.packet == packet  # decoded on demand


def test_pure_python_switch() -> None:
    env = dict(os.environ, TELTONIKA_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", "from teltonika_ingest.codec import accel;"
         "print(accel.payload_parts is None, accel.compiled_path_status())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("True off")


RECEIVED_MS = 1795341600123  # RECEIVED_AT
OK_TS = 1_700_000_000_000  # 2023-11-14


@pytest.mark.parametrize(
    ("overrides", "gps", "time"),
    [
        ({}, True, True),
        ({"satellites": 0}, False, True),
        ({"longitude": 0, "latitude": 0}, False, True),
        ({"longitude": 0}, True, True),
        ({"satellites": 0, "longitude": 0, "latitude": 0, "timestamp_ms": 0}, False, False),
        ({"timestamp_ms": 0}, True, False),
        ({"timestamp_ms": 1262304000000 - 1}, True, False),  # 2009-12-31T23:59:59.999Z
        ({"timestamp_ms": 1262304000000}, True, True),  # 2010-01-01T00:00:00.000Z
        ({"timestamp_ms": RECEIVED_MS + 600_000}, True, True),  # received_at + 10 min
        ({"timestamp_ms": RECEIVED_MS + 600_001}, True, False),
    ],
)
def test_quality_flags_agree_at_their_edges(overrides, gps, time) -> None:
    """gps_valid is decided in C, time_valid in payloads_and_flags: both byte-identical to
    the Python payload at the edges of contract.md section 8."""
    from support import make_record

    record = make_record(0, **{"timestamp_ms": OK_TS, **overrides})
    data = encode_avl_data(AvlPacket("8E", (record,)))
    assert check_agrees(data)
    payload = json.loads(python_side(data)[2][1])
    assert (payload["gps_valid"], payload["time_valid"]) == (gps, time)
    _, _, parts = fast(data)
    _, gps_bad, time_bad = payloads_and_flags(IMEI, RECEIVED_AT, parts)
    assert (gps_bad, time_bad) == (int(not gps), int(not time))
