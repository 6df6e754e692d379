"""The incremental Framer: early rejection, non-fatal frame errors, chunking."""

from __future__ import annotations

import pytest

import teltonika_ingest.codec.framing as framing
from teltonika_ingest.codec import (
    AvlFrame,
    AvlPacket,
    AvlRecord,
    BadPreamble,
    CommandFrame,
    CommandMessage,
    CountMismatch,
    CrcMismatch,
    FrameError,
    Framer,
    FrameTooLarge,
    Handshake,
    KeepAlive,
    Malformed,
    MalformedImei,
    UnknownCodec,
    crc16_ibm,
    encode_avl_frame,
    encode_command,
    encode_command_message,
    encode_imei,
    wrap_frame,
)

IMEI = "356307042441013"
HANDSHAKE = encode_imei(IMEI)
RECORD = AvlRecord(1560161086000, 1, 0, 0, 0, 0, 0, 0, 1, io1={1: 1}, io8={78: 2**64 - 1})
FRAME = encode_avl_frame(AvlPacket("8", (RECORD,)))


def events(framer: Framer) -> list:
    out = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


def framer_after_handshake(**kwargs) -> Framer:
    framer = Framer(**kwargs)
    framer.feed(HANDSHAKE)
    assert events(framer) == [Handshake(IMEI)]
    return framer


def assert_fatal(event, error_type) -> None:
    assert isinstance(event, FrameError)
    assert isinstance(event.error, error_type)
    assert event.error.fatal
    assert event.raw is None


def test_handshake_then_frame():
    framer = Framer()
    framer.feed(HANDSHAKE + FRAME)
    handshake, frame = events(framer)
    assert handshake == Handshake(IMEI)
    assert isinstance(frame, AvlFrame)
    assert frame.raw == FRAME
    assert frame.records == (RECORD,) and frame.codec == "8"
    assert framer.buffered == 0


def test_without_handshake():
    framer = Framer(expect_handshake=False)
    framer.feed(FRAME)
    (frame,) = events(framer)
    assert isinstance(frame, AvlFrame)


def test_two_frames_and_keepalives_in_one_feed():
    command = encode_command_message(CommandMessage("12", 6, b"OK"))
    framer = framer_after_handshake()
    framer.feed(b"\xff" + FRAME + b"\xff\xff" + command + FRAME)
    got = events(framer)
    assert [type(e) for e in got] == [
        KeepAlive,
        AvlFrame,
        KeepAlive,
        KeepAlive,
        CommandFrame,
        AvlFrame,
    ]
    assert got[4].message == CommandMessage("12", 6, b"OK")


def test_one_byte_chunks():
    framer = Framer()
    got = []
    stream = HANDSHAKE + FRAME + b"\xff" + FRAME
    for index in range(len(stream)):
        framer.feed(stream[index : index + 1])
        got.extend(events(framer))
    assert [type(e) for e in got] == [Handshake, AvlFrame, KeepAlive, AvlFrame]


def test_one_byte_chunks_of_a_64k_frame_are_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed a byte at a time, the framer does constant work per byte: the frame's bytes are
    CRC-checked and copied out exactly once, and a byte costs a bounded number of buffer
    reads whatever the buffer holds (counted, not timed: quadratic re-scanning of the
    buffer would multiply these counts by the frame size)."""
    rec = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, iox={1: bytes(30000), 2: bytes(35000)})
    frame = encode_avl_frame(AvlPacket("8E", (rec,)))
    assert 65000 < len(frame) - 12 <= 65536
    framer = framer_after_handshake()

    crc_bytes: list[int] = []
    real_crc = framing.crc16_ibm

    def counting_crc(data: bytes) -> int:
        crc_bytes.append(len(data))
        return real_crc(data)

    monkeypatch.setattr(framing, "crc16_ibm", counting_crc)

    class CountingBuffer(bytearray):
        read = 0  # bytes read out of the buffer (indexing and slicing)

        def __getitem__(self, key):  # type: ignore[no-untyped-def,override]
            got = super().__getitem__(key)
            CountingBuffer.read += len(got) if isinstance(got, bytearray) else 1
            return got

    framer._buf = CountingBuffer(framer._buf)
    got = []
    for index in range(len(frame)):
        framer.feed(frame[index : index + 1])
        event = framer.next_event()
        if event is not None:
            got.append(event)
    assert len(got) == 1 and isinstance(got[0], AvlFrame)
    assert got[0].records == (rec,)
    assert crc_bytes == [len(frame) - 12]  # the data field, once
    # a few header bytes read per fed byte, plus the frame copied out once
    assert CountingBuffer.read <= 16 * len(frame), CountingBuffer.read


def test_many_frames_fed_at_once_compact_the_buffer():
    framer = framer_after_handshake()
    framer.feed(FRAME * 5000)
    count = 0
    while (event := framer.next_event()) is not None:
        assert isinstance(event, AvlFrame)
        count += 1
        assert framer.buffered == (5000 - count) * len(FRAME)
    assert count == 5000
    assert len(framer._buf) < 2 * 65536 + len(FRAME)


# --------------------------------------------------------------------------- fatal, early


def test_declared_length_above_max_rejected_with_only_the_header():
    framer = framer_after_handshake(max_frame_size=1280)
    framer.feed(b"\x00\x00\x00\x00\x00\x00\x05\x01")
    (event,) = events(framer)
    assert_fatal(event, FrameTooLarge)
    assert event.error.offset == 4
    assert framer.failed


def test_max_frame_size_is_inclusive():
    framer = framer_after_handshake(max_frame_size=len(FRAME) - 12)
    framer.feed(FRAME)
    assert isinstance(framer.next_event(), AvlFrame)


def test_length_below_three_is_fatal():
    framer = framer_after_handshake()
    framer.feed(b"\x00\x00\x00\x00\x00\x00\x00\x02")
    (event,) = events(framer)
    assert_fatal(event, Malformed)


@pytest.mark.parametrize("prefix", [b"\x01", b"\x00\x00\x00\x07", b"\x00\x00\xff"])
def test_bad_preamble_rejected_as_soon_as_it_arrives(prefix):
    framer = framer_after_handshake()
    framer.feed(prefix)
    (event,) = events(framer)
    assert_fatal(event, BadPreamble)
    assert event.error.offset == len(prefix) - 1


def test_bad_preamble_byte_by_byte():
    framer = framer_after_handshake()
    for byte in (b"\x00", b"\x00"):
        framer.feed(byte)
        assert framer.next_event() is None
    framer.feed(b"\x09")
    assert_fatal(framer.next_event(), BadPreamble)


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00", b"\x00\x21", b"\xff\xff", b"\x00\x10", b"\x00\x01", b"\x00\x0e"],
    ids=["0", "33", "65535", "16", "1", "14"],
)
def test_bad_imei_length_rejected_with_two_bytes(data):
    framer = Framer()
    framer.feed(data)
    (event,) = events(framer)
    assert_fatal(event, MalformedImei)
    assert event.error.field == "imei_length"


def test_imei_non_digit_rejected_as_soon_as_it_arrives():
    framer = Framer()
    framer.feed(b"\x00\x0f35")
    assert framer.next_event() is None
    framer.feed(b"6x")
    (event,) = events(framer)
    assert_fatal(event, MalformedImei)
    assert event.error.offset == 5


def test_keepalive_before_handshake_is_a_bad_imei():
    framer = Framer()
    framer.feed(b"\xff")
    assert framer.next_event() is None
    framer.feed(b"\x00")
    assert_fatal(framer.next_event(), MalformedImei)


def test_failed_stays_failed():
    framer = framer_after_handshake()
    framer.feed(b"\x01" + FRAME)
    assert_fatal(framer.next_event(), BadPreamble)
    assert framer.failed
    framer.feed(FRAME)
    assert framer.next_event() is None
    assert framer.next_event() is None
    assert framer.failed
    assert framer.buffered == 0


# --------------------------------------------------------------------------- non-fatal


def test_crc_failure_is_reported_and_the_stream_continues():
    bad = bytearray(FRAME)
    bad[30] ^= 0x01
    framer = framer_after_handshake()
    framer.feed(bytes(bad) + FRAME)
    error, good = events(framer)
    assert isinstance(error, FrameError)
    assert isinstance(error.error, CrcMismatch) and not error.error.fatal
    assert error.raw == bytes(bad)
    assert error.error.offset == len(FRAME) - 4
    assert (error.codec_id, error.declared_count) == (8, 1)
    assert isinstance(good, AvlFrame)
    assert not framer.failed


def test_crc_upper_bytes_must_be_zero():
    bad = bytearray(FRAME)
    bad[-3] = 0x01
    framer = framer_after_handshake()
    framer.feed(bytes(bad))
    (error,) = events(framer)
    assert isinstance(error.error, CrcMismatch)
    assert error.error.expected == int.from_bytes(bad[-4:], "big")


def recrc(data: bytes) -> bytes:
    return wrap_frame(data)


def test_count_mismatch_event_carries_raw_and_declared_count():
    data = bytearray(FRAME[8:-4])
    data[-1] = 7
    frame = recrc(bytes(data))
    framer = framer_after_handshake()
    framer.feed(frame)
    (event,) = events(framer)
    assert isinstance(event, FrameError)
    assert isinstance(event.error, CountMismatch)
    assert not event.error.fatal
    assert event.raw == frame
    assert event.codec_id == 0x08
    assert event.declared_count == 1
    assert event.error.offset == len(frame) - 5


def test_unknown_codec_event():
    frame = recrc(b"\x99\x03" + b"\x00" * 10 + b"\x03")
    framer = framer_after_handshake()
    framer.feed(frame + FRAME)
    event, good = events(framer)
    assert isinstance(event, FrameError)
    assert isinstance(event.error, UnknownCodec)
    assert event.error.codec_id == 0x99
    assert (event.raw, event.codec_id, event.declared_count) == (frame, 0x99, 3)
    assert isinstance(good, AvlFrame)


def test_malformed_body_event():
    data = FRAME[8:-4]
    frame = recrc(data[:-1] + b"\x00" + data[-1:])  # a trailing byte before number of data 2
    framer = framer_after_handshake()
    framer.feed(frame)
    (event,) = events(framer)
    assert isinstance(event.error, Malformed) and not event.error.fatal
    assert event.raw == frame and event.declared_count == 1


def test_timestamp_past_year_9999_event():
    rec = AvlRecord(253402300800000, 0, 0, 0, 0, 0, 0, 0, 0)
    frame = encode_avl_frame(AvlPacket("8", (rec,)))
    framer = framer_after_handshake()
    framer.feed(frame)
    (event,) = events(framer)
    assert isinstance(event.error, Malformed)
    assert event.error.field == "timestamp"


def test_command_frames():
    framer = framer_after_handshake()
    framer.feed(encode_command(b"getver", codec="14", imei="352093081452251"))
    (event,) = events(framer)
    assert isinstance(event, CommandFrame)
    assert event.message == CommandMessage("14", 5, b"getver", "352093081452251")


def test_command_frame_malformed_body():
    frame = recrc(bytes.fromhex("0c020500000002414201"))
    framer = framer_after_handshake()
    framer.feed(frame)
    (event,) = events(framer)
    assert isinstance(event.error, Malformed)
    assert (event.codec_id, event.declared_count) == (0x0C, 2)


def test_internal_errors_become_fatal_events(monkeypatch):
    from teltonika_ingest.codec import framing

    def boom(*args):
        raise RuntimeError("bug")

    monkeypatch.setattr(framing, "_decode_frame", boom)
    framer = framer_after_handshake()
    framer.feed(FRAME)
    event = framer.next_event()
    assert isinstance(event, FrameError) and event.error.fatal
    assert "RuntimeError" in str(event.error)
    assert framer.failed


def test_crc_of_decoded_frames_is_right():
    framer = framer_after_handshake()
    framer.feed(FRAME)
    (event,) = events(framer)
    assert crc16_ibm(event.raw[8:-4]) == int.from_bytes(event.raw[-4:], "big")
