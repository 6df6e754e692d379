"""Codec 8 / 8E / 16 records: decoding details, strictness and the encoder's limits."""

from __future__ import annotations

import attrs
import pytest

from teltonika_ingest.codec import (
    MAX_TIMESTAMP_MS,
    AvlPacket,
    AvlRecord,
    BadPreamble,
    CodecError,
    CountMismatch,
    CrcMismatch,
    Malformed,
    Truncated,
    UnknownCodec,
    crc16_ibm,
    decode_avl_data,
    decode_avl_frame,
    encode_avl_data,
    encode_avl_frame,
    format_timestamp,
    wrap_frame,
)
from teltonika_ingest.codec import avl as avl_module


def record(**changes) -> AvlRecord:
    base = AvlRecord(
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
        io4={241: 24602},
        io8={78: 0},
    )
    return attrs.evolve(base, **changes)


def packet(codec: str = "8", *records: AvlRecord) -> AvlPacket:
    if codec == "16":
        records = tuple(attrs.evolve(r, generation_type=r.generation_type or 5) for r in records)
    return AvlPacket(codec, records or (record(generation_type=5 if codec == "16" else None),))


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("codec", ["8", "8E", "16"])
def test_round_trip_extremes(codec):
    wide_id = 0xFF if codec == "8" else 0xFFFF
    rec = record(
        timestamp_ms=MAX_TIMESTAMP_MS - 1,
        priority=255,
        longitude=-(2**31),
        latitude=2**31 - 1,
        altitude=-32768,
        angle=65535,
        satellites=255,
        speed=65535,
        event_io_id=wide_id,
        generation_type=255 if codec == "16" else None,
        io1={0: 0, wide_id: 255},
        io2={2: 65535},
        io4={4: 2**32 - 1},
        io8={8: 2**64 - 1, 9: 2**63},
    )
    pkt = AvlPacket(codec, (rec,))
    assert decode_avl_frame(encode_avl_frame(pkt)) == pkt
    assert format_timestamp(rec.timestamp_ms) == "9999-12-31T23:59:59.999Z"


def test_codec8e_nx_values():
    rec = record(iox={385: b"\x01\x02\x03\x04", 386: b"", 1000: bytes(range(256)) * 4})
    pkt = AvlPacket("8E", (rec,))
    decoded = decode_avl_frame(encode_avl_frame(pkt))
    assert decoded == pkt
    assert decoded.records[0].iox[1000] == bytes(range(256)) * 4
    assert type(decoded.records[0].iox[385]) is bytes


def test_255_records():
    records = tuple(record(timestamp_ms=1560161086000 + i) for i in range(255))
    pkt = AvlPacket("8E", records)
    frame = encode_avl_frame(pkt)
    assert frame[9] == 255 and frame[-5] == 255
    assert decode_avl_frame(frame) == pkt


def test_zero_records_is_structurally_valid():
    assert decode_avl_data(bytes([0x08, 0, 0])) == AvlPacket("8", ())


def test_fast_records_are_real_frozen_avl_records():
    rec = record(iox={5: b"x"})
    decoded = decode_avl_data(encode_avl_data(AvlPacket("8E", (rec,)))).records[0]
    assert type(decoded) is AvlRecord
    assert decoded == rec and rec == decoded
    assert attrs.asdict(decoded) == attrs.asdict(rec)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        decoded.speed = 1  # type: ignore[misc]
    assert repr(decoded) == repr(rec)
    assert avl_module._SETTERS is not None  # the fast path is the one in use


def test_io_dicts_are_not_shared_between_records():
    pkt = decode_avl_data(
        encode_avl_data(AvlPacket("8", (record(io1={}, io2={}, io4={}, io8={}),) * 2))
    )
    first, second = pkt.records
    for name in ("io1", "io2", "io4", "io8", "iox"):
        assert getattr(first, name) is not getattr(second, name)


def test_values_are_unsigned_and_coordinates_signed():
    data = bytearray(encode_avl_data(packet("8")))
    # longitude field of record 1 is at offset 2 + 9
    data[11:15] = b"\xff\xff\xff\xff"
    rec = decode_avl_data(bytes(data)).records[0]
    assert rec.longitude == -1
    raw8 = bytearray(encode_avl_data(AvlPacket("8", (record(io8={78: 2**64 - 1}),))))
    assert decode_avl_data(bytes(raw8)).records[0].io8 == {78: 2**64 - 1}


# --------------------------------------------------------------------------- strictness


def codec8_single() -> bytes:
    return encode_avl_data(packet("8"))


def test_count_mismatch():
    data = bytearray(codec8_single())
    data[-1] = 2
    with pytest.raises(CountMismatch) as info:
        decode_avl_data(bytes(data), offset_base=8)
    assert info.value.count1 == 1 and info.value.count2 == 2
    assert info.value.offset == 8 + len(data) - 1
    assert info.value.field == "number_of_data_2"


def test_trailing_bytes_after_records():
    data = codec8_single()
    bad = data[:-1] + b"\x00\x00" + data[-1:]
    with pytest.raises(Malformed) as info:
        decode_avl_data(bad)
    assert info.value.field == "number_of_data_2"


def test_more_records_declared_than_present():
    data = bytearray(codec8_single())
    data[1] = 2
    data[-1] = 2
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(data), offset_base=8)
    assert "record 2" in str(info.value)
    assert info.value.offset is not None and info.value.offset >= 8


@pytest.mark.parametrize("cut", [1, 5, 20, 30])
def test_truncated_data_field(cut):
    data = codec8_single()
    with pytest.raises(Malformed):
        decode_avl_data(data[: -1 - cut] + data[-1:])


def test_total_io_count_must_match_group_counts():
    data = bytearray(codec8_single())
    total_at = 2 + 24 + 1  # after the 24-byte prefix and the 1-byte event id
    assert data[total_at] == 5
    data[total_at] = 6
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(data), offset_base=8)
    assert info.value.field == "io_total"
    assert info.value.offset == 8 + total_at


@pytest.mark.parametrize(("codec", "total_at"), [("8E", 2 + 24 + 2), ("16", 2 + 24 + 2 + 1)])
def test_total_io_count_offsets_per_codec(codec, total_at):
    data = bytearray(encode_avl_data(packet(codec)))
    data[total_at + (1 if codec == "8E" else 0)] += 1
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(data))
    assert info.value.field == "io_total"
    assert info.value.offset == total_at


def test_duplicate_io_id_in_a_group():
    data = bytearray(codec8_single())
    # io1 group: N1 at 28, then (21, 3), (1, 1): make the second id 21 too.
    assert data[28] == 2 and data[29] == 21 and data[31] == 1
    data[31] = 21
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(data))
    assert info.value.field == "io_id"


def test_same_id_in_two_groups_round_trips():
    rec = record(io1={7: 1}, io2={7: 2}, io4={}, io8={})
    pkt = AvlPacket("8", (rec,))
    assert decode_avl_data(encode_avl_data(pkt)) == pkt


def test_timestamp_beyond_year_9999_is_malformed():
    data = encode_avl_data(AvlPacket("8", (record(timestamp_ms=MAX_TIMESTAMP_MS),)))
    with pytest.raises(Malformed) as info:
        decode_avl_data(data, offset_base=8)
    assert info.value.field == "timestamp"
    assert info.value.offset == 10


def test_unknown_codec():
    with pytest.raises(UnknownCodec) as info:
        decode_avl_data(b"\x09\x00\x00", offset_base=8)
    assert info.value.codec_id == 9 and info.value.offset == 8
    with pytest.raises(UnknownCodec):
        decode_avl_data(b"\x0c\x01\x05\x00\x00\x00\x00\x01")


@pytest.mark.parametrize("data", [b"", b"\x08", b"\x08\x00"])
def test_too_short(data):
    with pytest.raises(Malformed):
        decode_avl_data(data)


def test_hostile_group_count_is_rejected_without_compiling_it():
    body = bytearray(encode_avl_data(AvlPacket("8E", (record(io1={}, io2={}, io4={}, io8={}),))))
    n1_at = 2 + 24 + 2 + 2
    body[n1_at : n1_at + 2] = b"\xff\xff"
    body[n1_at - 2 : n1_at] = b"\xff\xff"
    before = len(avl_module._LAYOUTS[0x8E].groups[1])
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(body))
    assert info.value.field == "io1"
    assert len(avl_module._LAYOUTS[0x8E].groups[1]) == before


def test_nx_value_past_the_end():
    data = bytearray(encode_avl_data(AvlPacket("8E", (record(iox={5: b"abc"}),))))
    length_at = len(data) - 1 - 3 - 2
    assert data[length_at : length_at + 2] == b"\x00\x03"
    data[length_at : length_at + 2] = b"\x00\x09"
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(data))
    assert info.value.field == "iox"


def test_group_cache_is_bounded():
    layout = avl_module._LAYOUTS[0x8E]
    big = {i: i & 0xFF for i in range(300)}
    pkt = AvlPacket("8E", (record(io1=big, io2={}, io4={}, io8={}),))
    assert decode_avl_data(encode_avl_data(pkt)) == pkt
    assert 300 not in layout.groups[1]


# --------------------------------------------------------------------------- frames


def test_frame_errors():
    frame = encode_avl_frame(packet("8"))
    with pytest.raises(BadPreamble) as bad:
        decode_avl_frame(b"\x00\x01" + frame[2:])
    assert bad.value.offset == 1 and bad.value.fatal
    with pytest.raises(Truncated):
        decode_avl_frame(frame[:-1])
    with pytest.raises(Truncated):
        decode_avl_frame(frame[:5])
    with pytest.raises(Malformed):
        decode_avl_frame(frame + b"\x00")
    corrupt = bytearray(frame)
    corrupt[20] ^= 0x40
    with pytest.raises(CrcMismatch) as crc:
        decode_avl_frame(bytes(corrupt))
    assert crc.value.offset == len(frame) - 4
    assert crc.value.expected == int.from_bytes(frame[-4:], "big")
    assert crc.value.actual == crc16_ibm(bytes(corrupt[8:-4]))
    upper = bytearray(frame)
    upper[-4] = 1
    with pytest.raises(CrcMismatch):
        decode_avl_frame(bytes(upper))
    with pytest.raises(Malformed):
        decode_avl_frame(bytes(8) + b"\x00\x00\x00")  # length 0


def test_frame_offsets_are_frame_relative():
    frame = bytearray(encode_avl_frame(packet("8")))
    frame[-5] = 3  # number of data 2
    frame[-4:] = crc16_ibm(bytes(frame[8:-4])).to_bytes(4, "big")
    with pytest.raises(CountMismatch) as info:
        decode_avl_frame(bytes(frame))
    assert info.value.offset == len(frame) - 5
    assert str(info.value).endswith(f"(field number_of_data_2, offset {len(frame) - 5})")


def test_command_frame_is_not_avl():
    frame = wrap_frame(bytes.fromhex("0c010500000007676574696e666f01"))
    with pytest.raises(UnknownCodec):
        decode_avl_frame(frame)


def test_errors_are_codec_errors():
    for cls in (BadPreamble, CountMismatch, CrcMismatch, Malformed, Truncated, UnknownCodec):
        assert issubclass(cls, CodecError)


# --------------------------------------------------------------------------- encoder


@pytest.mark.parametrize(
    ("pkt", "message"),
    [
        (AvlPacket("9", ()), "not an AVL codec"),
        (AvlPacket("8", (record(),) * 256), "at most 255"),
        (AvlPacket("8", (record(iox={1: b"x"}),)), "NX"),
        (AvlPacket("16", (record(generation_type=None),)), "generation type"),
        (AvlPacket("8", (record(io1={300: 1}),)), "record 1"),
        (AvlPacket("8", (record(io2={1: 70000}),)), "record 1"),
        (AvlPacket("8", (record(speed=-1),)), "record 1"),
        (AvlPacket("8", (record(io1={i: 0 for i in range(256)}, io2={}, io4={}, io8={}),)), "255"),
    ],
)
def test_encoder_rejects(pkt, message):
    with pytest.raises(ValueError, match=message):
        encode_avl_data(pkt)


def test_encoder_computes_total_and_ignores_generation_type_outside_codec16():
    rec = record(generation_type=3)
    data = encode_avl_data(AvlPacket("8", (rec,)))
    assert data[2 + 24 + 1] == 5
    assert decode_avl_data(data).records[0].generation_type is None


# --------------------------------------------------------------------------- compiled layouts


@pytest.fixture
def fresh_compiled(monkeypatch):
    """Empty layout caches for one test (restored afterwards)."""
    monkeypatch.setattr(avl_module, "_compiled", {})
    monkeypatch.setattr(avl_module, "_sightings", {})
    for layout in avl_module._LAYOUTS.values():
        monkeypatch.setattr(layout, "last_compiled", None)
    return avl_module


def decode_generic(data: bytes, monkeypatch) -> AvlPacket:
    with monkeypatch.context() as patch:
        patch.setattr(avl_module, "_COMPILE_MAX_IOS", -1)
        for layout in avl_module._LAYOUTS.values():
            patch.setattr(layout, "last_compiled", None)
        return decode_avl_data(data)


def uniform_packet(codec: str, count: int = 10) -> AvlPacket:
    return AvlPacket(
        codec,
        tuple(
            record(
                timestamp_ms=1560161086000 + i,
                generation_type=i % 8 if codec == "16" else None,
                io1={21: i % 256, 1: 1},
                io2={66: i},
                io4={241: 7 * i},
                io8={78: 2**64 - 1 - i},
            )
            for i in range(count)
        ),
    )


@pytest.mark.parametrize("codec", ["8", "8E", "16"])
def test_compiled_layout_is_used_and_equal(fresh_compiled, monkeypatch, codec):
    pkt = uniform_packet(codec)
    data = encode_avl_data(pkt)
    layout = fresh_compiled._LAYOUTS[pkt_codec_id(codec)]
    assert decode_avl_data(data) == pkt
    assert layout.last_compiled is not None  # compiled on the 3rd record
    assert len(fresh_compiled._compiled) == 1
    assert decode_avl_data(data) == pkt  # every record through the compiled path
    assert decode_generic(data, monkeypatch) == pkt
    decoded = decode_avl_data(data).records[0]
    assert type(decoded) is AvlRecord and list(decoded.io1) == [21, 1]


def pkt_codec_id(codec: str) -> int:
    return {"8": 0x08, "8E": 0x8E, "16": 0x10}[codec]


def test_compiled_guess_falls_back_on_other_layouts(fresh_compiled):
    decode_avl_data(encode_avl_data(uniform_packet("8E")))
    assert fresh_compiled._LAYOUTS[0x8E].last_compiled is not None
    other = (
        record(io1={21: 1, 2: 1}),  # other ids, same counts: the compiled path
        record(io1={21: 1}),  # another count
        record(iox={9: b"nx"}),  # NX values
        record(timestamp_ms=5),
        record(io1={21: 3, 1: 1}, io2={66: 1}, io4={241: 1}, io8={78: 5}),  # the same layout
    )
    pkt = AvlPacket("8E", other)
    assert decode_avl_data(encode_avl_data(pkt)) == pkt


def test_repeated_id_in_a_compiled_layout_is_still_rejected(fresh_compiled):
    data = encode_avl_data(uniform_packet("8"))
    decode_avl_data(data)
    assert fresh_compiled._LAYOUTS[0x08].last_compiled is not None
    bad = bytearray(data)
    # record 1, io1 group: N1 at 28, then (21, v), (1, 1): make the second id 21 too.
    assert bad[28] == 2 and bad[29] == 21 and bad[31] == 1
    bad[31] = 21
    with pytest.raises(Malformed) as info:
        decode_avl_data(bytes(bad))
    assert info.value.field == "io_id"


def test_compiled_path_still_rejects_bad_timestamps_and_overruns(fresh_compiled):
    data = encode_avl_data(uniform_packet("8"))
    decode_avl_data(data)
    late = AvlPacket("8", (*uniform_packet("8", 3).records, record(timestamp_ms=MAX_TIMESTAMP_MS)))
    with pytest.raises(Malformed, match="past year 9999"):
        decode_avl_data(encode_avl_data(late))
    short = bytearray(data)
    short[1] = short[-1] = 11  # declares one record more than present
    with pytest.raises(Malformed):
        decode_avl_data(bytes(short))


def test_layout_compiled_only_after_repeated_sightings(fresh_compiled):
    single = encode_avl_data(uniform_packet("16", 1))
    decode_avl_data(single)
    decode_avl_data(single)
    assert not fresh_compiled._compiled
    decode_avl_data(single)
    assert len(fresh_compiled._compiled) == 1


def test_layout_caches_are_bounded(fresh_compiled, monkeypatch):
    monkeypatch.setattr(fresh_compiled, "_CACHE_MAX_LAYOUTS", 4)
    monkeypatch.setattr(fresh_compiled, "_COMPILE_AFTER", 1)
    for io_id in range(10):
        decode_avl_data(
            encode_avl_data(AvlPacket("8", (record(io1={io_id: 1}, io2={}, io4={}, io8={}),)))
        )
    assert 0 < len(fresh_compiled._compiled) <= 4


def test_large_layouts_are_not_compiled(fresh_compiled):
    big = record(io1={i: 1 for i in range(200)}, io2={}, io4={}, io8={})
    pkt = AvlPacket("8E", (big,) * 5)
    assert decode_avl_data(encode_avl_data(pkt)) == pkt
    assert not fresh_compiled._compiled


def test_alternating_layouts_use_compiled_decoders(fresh_compiled, monkeypatch):
    a = record(io1={1: 1, 2: 2}, io2={3: 3}, io4={}, io8={})
    b = record(io1={1: 1}, io2={3: 3, 4: 4}, io4={5: 5}, io8={6: 6})
    pkt = AvlPacket("8E", tuple(attrs.evolve(r, timestamp_ms=i) for i, r in enumerate([a, b] * 4)))
    data = encode_avl_data(pkt)
    for _ in range(3):
        assert decode_avl_data(data) == pkt
    assert len(fresh_compiled._compiled) == 2
    generic = []
    real = fresh_compiled._compiled_for
    monkeypatch.setattr(fresh_compiled, "_compiled_for", lambda *a: generic.append(a) or real(*a))
    assert decode_avl_data(data) == pkt
    assert generic == []  # every record, a or b, went through a compiled decoder


def test_probe_survives_truncated_records(fresh_compiled):
    data = encode_avl_data(uniform_packet("8E"))
    for _ in range(2):
        decode_avl_data(data)
    for cut in range(3, 60):
        with pytest.raises(Malformed):
            decode_avl_data(data[:-cut] + data[-1:])
