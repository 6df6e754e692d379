"""Property-based tests of the codec: encoder/decoder round trips for every codec,
chunking independence of the Framer, and robustness against arbitrary bytes."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from teltonika_ingest.codec import (
    MAX_TIMESTAMP_MS,
    AvlFrame,
    AvlPacket,
    AvlRecord,
    CodecError,
    CommandFrame,
    CommandMessage,
    FrameError,
    Framer,
    Handshake,
    KeepAlive,
    UdpPacket,
    crc16_ibm,
    decode_avl_data,
    decode_avl_frame,
    decode_command_data,
    decode_command_frame,
    decode_imei,
    decode_udp_datagram,
    encode_avl_data,
    encode_avl_frame,
    encode_command_data,
    encode_command_message,
    encode_imei,
    encode_udp_datagram,
    record_payload,
    wrap_frame,
)

# Big packets (255 records, 1 KiB NX values) are generated, so the usual "too slow"
# and "too large" health checks would only flag the intent.
RELAXED = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
IMEIS = st.text(alphabet="0123456789", min_size=15, max_size=15)
VALUES = {
    1: U8,
    2: U16,
    4: st.integers(0, 2**32 - 1),
    8: st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1])),
    "x": st.one_of(st.binary(max_size=64), st.binary(min_size=1000, max_size=1024)),
}


@st.composite
def avl_records(draw: st.DrawFn, codec: str, max_ios: int = 24) -> AvlRecord:
    wide = codec != "8"
    widths: list[Any] = [1, 2, 4, 8] + (["x"] if codec == "8E" else [])
    ids = draw(st.lists(U16 if wide else U8, unique=True, max_size=max_ios))
    groups: dict[Any, dict[int, Any]] = {w: {} for w in widths}
    for io_id in ids:
        width = draw(st.sampled_from(widths))
        groups[width][io_id] = draw(VALUES[width])
    return AvlRecord(
        timestamp_ms=draw(st.integers(0, MAX_TIMESTAMP_MS - 1)),
        priority=draw(U8),
        longitude=draw(st.integers(-(2**31), 2**31 - 1)),
        latitude=draw(st.integers(-(2**31), 2**31 - 1)),
        altitude=draw(st.integers(-(2**15), 2**15 - 1)),
        angle=draw(U16),
        satellites=draw(U8),
        speed=draw(U16),
        event_io_id=draw(U16 if wide else U8),
        generation_type=draw(U8) if codec == "16" else None,
        io1=groups[1],
        io2=groups[2],
        io4=groups[4],
        io8=groups[8],
        iox=groups.get("x", {}),
    )


@st.composite
def avl_packets(draw: st.DrawFn, codec: str | None = None, max_records: int = 255) -> AvlPacket:
    codec = codec or draw(st.sampled_from(["8", "8E", "16"]))
    # Mostly short packets; sometimes the full 255 records with few IOs each.
    if draw(st.integers(0, 9)) == 0:
        count = draw(st.integers(1, max_records))
        rec = avl_records(codec, max_ios=3)
    else:
        count = draw(st.integers(1, min(5, max_records)))
        rec = avl_records(codec)
    return AvlPacket(codec, tuple(draw(rec) for _ in range(count)))


@st.composite
def command_messages(draw: st.DrawFn) -> CommandMessage:
    codec, msg_type = draw(
        st.sampled_from(
            [("12", 5), ("12", 6), ("13", 5), ("13", 6), ("14", 5), ("14", 6), ("14", 0x11)]
        )
    )
    payload = b"" if msg_type == 0x11 else draw(st.binary(max_size=300))
    imei = draw(IMEIS) if codec == "14" else None
    timestamp = draw(st.integers(0, 2**32 - 1)) * 1000 if codec == "13" else None
    return CommandMessage(codec, msg_type, payload, imei, timestamp)


# --------------------------------------------------------------------------- round trips


@RELAXED
@given(avl_packets())
def test_avl_round_trip(packet):
    data = encode_avl_data(packet)
    assert decode_avl_data(data) == packet
    frame = encode_avl_frame(packet)
    assert decode_avl_frame(frame) == packet
    assert frame[8:-4] == data


@st.composite
def uniform_packets(draw: st.DrawFn) -> AvlPacket:
    """Packets whose records share one IO layout (as a device sends them), with an
    occasional odd record: they go through the compiled-layout decoder."""
    codec = draw(st.sampled_from(["8", "8E", "16"]))
    template = draw(avl_records(codec))
    records = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.integers(0, 5)) == 0:
            records.append(draw(avl_records(codec)))
            continue
        values = {
            w: {k: draw(VALUES[w]) for k in group}
            for w, group in (
                (1, template.io1),
                (2, template.io2),
                (4, template.io4),
                (8, template.io8),
            )
        }
        fresh = draw(avl_records(codec, max_ios=0))
        records.append(
            AvlRecord(
                fresh.timestamp_ms,
                fresh.priority,
                fresh.longitude,
                fresh.latitude,
                fresh.altitude,
                fresh.angle,
                fresh.satellites,
                fresh.speed,
                fresh.event_io_id,
                fresh.generation_type,
                values[1],
                values[2],
                values[4],
                values[8],
                dict(template.iox),
            )
        )
    return AvlPacket(codec, tuple(records))


@RELAXED
@given(uniform_packets())
def test_repeated_layouts_round_trip(packet):
    data = encode_avl_data(packet)
    for _ in range(3):  # the 3rd sighting of a layout compiles it; later ones use it
        assert decode_avl_data(data) == packet


@RELAXED
@given(avl_packets(max_records=40), U16, U8, IMEIS)
def test_udp_round_trip(packet, packet_id, avl_packet_id, imei):
    datagram = UdpPacket(packet_id, avl_packet_id, imei, packet)
    raw = encode_udp_datagram(datagram)
    assert decode_udp_datagram(raw) == datagram


@given(command_messages())
def test_command_round_trip(message):
    frame = encode_command_message(message)
    assert decode_command_frame(frame) == message
    assert decode_command_data(encode_command_data(message)) == message


@given(IMEIS)
def test_imei_round_trip(imei):
    assert decode_imei(encode_imei(imei)) == imei


@RELAXED
@given(st.sampled_from(["8", "8E", "16"]).flatmap(avl_records), IMEIS)
def test_payload_json_round_trip(record, imei):
    payload = orjson.loads(record_payload(record, imei, "8E", "2026-01-01T00:00:00.000Z"))
    assert list(payload) == [
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
    assert payload["gps_valid"] is (
        record.satellites != 0 and (record.longitude != 0 or record.latitude != 0)
    )
    assert payload["time_valid"] is (
        1262304000000 <= record.timestamp_ms <= 1767225600000 + 600_000
    )
    assert payload["device_id"] == imei
    assert payload["longitude"] == record.longitude / 1e7
    assert payload["latitude"] == record.latitude / 1e7
    attributes = payload["attributes"]
    expected: dict[str, Any] = {}
    for group in (record.io1, record.io2, record.io4):
        expected.update({str(k): v for k, v in group.items()})
    for k, v in record.io8.items():
        expected[str(k)] = {"__bigint": str(v)}
    for k, raw in record.iox.items():
        expected[str(k)] = {"__buffer_b64": base64.b64encode(raw).decode()}
    assert attributes == expected
    assert list(attributes) == list(expected)
    for key, value in attributes.items():
        if isinstance(value, dict) and "__bigint" in value:
            assert int(value["__bigint"]) == record.io8[int(key)]
        elif isinstance(value, dict):
            assert base64.b64decode(value["__buffer_b64"]) == record.iox[int(key)]
        else:
            assert type(value) is int


# --------------------------------------------------------------------------- framer


@st.composite
def stream_items(draw: st.DrawFn) -> tuple[bytes, Any]:
    """One item of a device stream: its bytes and the event it must produce."""
    kind = draw(st.sampled_from(["avl", "command", "keepalive", "crc", "unknown"]))
    if kind == "avl":
        packet = draw(avl_packets(max_records=4))
        raw = encode_avl_frame(packet)
        return raw, AvlFrame(packet, raw)
    if kind == "command":
        message = draw(command_messages())
        raw = encode_command_message(message)
        return raw, CommandFrame(message, raw)
    if kind == "keepalive":
        return b"\xff", KeepAlive()
    if kind == "crc":
        raw = bytearray(encode_avl_frame(draw(avl_packets(max_records=2))))
        raw[-1] ^= draw(st.integers(1, 255))
        return bytes(raw), ("crc", bytes(raw))
    codec_id = draw(st.integers(0, 255).filter(lambda c: c not in (8, 0x8E, 0x10, 12, 13, 14)))
    raw = wrap_frame(bytes([codec_id, 1]) + draw(st.binary(max_size=40)) + b"\x01")
    return raw, ("unknown", raw)


def same_event(event: Any, expected: Any) -> bool:
    if isinstance(expected, tuple):
        _, raw = expected
        return isinstance(event, FrameError) and event.raw == raw and not event.error.fatal
    return bool(event == expected)


def comparable(event: Any) -> Any:
    """Events as comparable values (exceptions compare by identity)."""
    if isinstance(event, FrameError):
        error = event.error
        return (
            type(error),
            str(error),
            error.fatal,
            event.raw,
            event.codec_id,
            event.declared_count,
        )
    return event


def drain(framer: Framer) -> list[Any]:
    out = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


@RELAXED
@given(IMEIS, st.lists(stream_items(), max_size=8), st.data())
def test_any_split_gives_the_same_events(imei, items, data):
    stream = encode_imei(imei) + b"".join(raw for raw, _ in items)
    expected = [Handshake(imei)] + [event for _, event in items]

    whole = Framer()
    whole.feed(stream)
    got_whole = drain(whole)
    assert len(got_whole) == len(expected)
    assert all(same_event(g, e) for g, e in zip(got_whole, expected, strict=True))
    assert whole.buffered == 0 and not whole.failed

    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    chunked = Framer()
    got_chunked: list[Any] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        chunked.feed(stream[previous:cut])
        previous = cut
        got_chunked.extend(drain(chunked))
    assert list(map(comparable, got_chunked)) == list(map(comparable, got_whole))


@st.composite
def frame_like(draw: st.DrawFn) -> bytes:
    """Bytes that get past the preamble (and often the CRC): they reach the decoders."""
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            st.builds(
                lambda cid, rest: bytes([cid]) + rest,
                st.sampled_from([8, 0x8E, 0x10, 12, 13, 14]),
                st.binary(max_size=200),
            ),
        )
    )
    good_crc = draw(st.booleans())
    crc = crc16_ibm(body) if good_crc else draw(st.integers(0, 2**32 - 1))
    length = len(body) if draw(st.integers(0, 5)) else draw(st.integers(0, 300))
    return b"\x00\x00\x00\x00" + length.to_bytes(4, "big") + body + crc.to_bytes(4, "big")


GARBAGE = st.lists(
    st.one_of(st.binary(max_size=64), frame_like(), st.just(b"\xff")), max_size=6
).map(b"".join)


@RELAXED
@given(st.booleans(), GARBAGE, st.lists(st.integers(1, 64), max_size=20))
def test_random_bytes_never_break_the_framer(with_handshake, garbage, chunk_sizes):
    framer = Framer(max_frame_size=1024, expect_handshake=with_handshake)
    stream = (encode_imei("356307042441013") if with_handshake else b"") + garbage
    position = 0
    sizes = iter(chunk_sizes)
    while position < len(stream):
        size = next(sizes, len(stream))
        framer.feed(stream[position : position + size])
        position += size
        while (event := framer.next_event()) is not None:
            assert isinstance(event, Handshake | KeepAlive | AvlFrame | CommandFrame | FrameError)
            if isinstance(event, AvlFrame | CommandFrame):
                raw = event.raw
                assert raw[:4] == bytes(4)
                assert int.from_bytes(raw[4:8], "big") == len(raw) - 12
                assert int.from_bytes(raw[-4:], "big") == crc16_ibm(raw[8:-4])
            if isinstance(event, FrameError):
                assert isinstance(event.error, CodecError)
                assert event.error.fatal == (event.raw is None)
                if event.error.fatal:
                    assert framer.failed
    if framer.failed:
        assert framer.next_event() is None


@RELAXED
@given(st.one_of(GARBAGE, frame_like().map(lambda f: f[8:-4])))
def test_random_bytes_only_raise_codec_errors(data):
    for decode in (
        decode_avl_data,
        decode_avl_frame,
        decode_command_data,
        decode_command_frame,
        decode_udp_datagram,
        decode_imei,
    ):
        with contextlib.suppress(CodecError):
            decode(data)


def damaged(raw: bytes, data: st.DataObject) -> bytes:
    """``raw`` with 1-3 random byte flips, insertions or deletions."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            buf[where] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            buf[where:where] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(buf) > 1:
            del buf[where]
    return bytes(buf)


@RELAXED
@given(avl_packets(max_records=3), st.data())
def test_mutated_data_fields_decode_canonically_or_fail_cleanly(packet, data):
    """A damaged data field either raises a CodecError or decodes to a packet that
    encodes back to exactly those bytes: the decoder accepts nothing it cannot
    represent."""
    mutated = damaged(encode_avl_data(packet), data)
    try:
        decoded = decode_avl_data(mutated)
    except CodecError:
        return
    assume(all(not _shared_ids(r) for r in decoded.records))
    assert encode_avl_data(decoded) == mutated
    frame = wrap_frame(mutated)
    framer = Framer(expect_handshake=False)
    framer.feed(frame)
    assert framer.next_event() == AvlFrame(decoded, frame)


def _shared_ids(record: AvlRecord) -> bool:
    groups = [record.io1, record.io2, record.io4, record.io8, record.iox]
    return sum(map(len, groups)) != len(set().union(*groups))
