"""Simulated traffic: device IMEIs, realistic AVL packets and the frame templates that make
sending one cheap (encoded once, timestamps and CRC patched in place)."""

from __future__ import annotations

import random
import struct

import attrs

from teltonika_ingest.codec import (
    CODEC_8E,
    CODEC_16,
    AvlPacket,
    AvlRecord,
    UdpPacket,
    crc16_ibm,
    encode_avl_data,
    encode_udp_datagram,
    wrap_frame,
)
from teltonika_ingest.codec.imei import luhn_digit

CODEC_CHOICES = ("8", "8E", "16", "mix")
AVL_CODEC_IDS = frozenset({0x08, 0x8E, 0x10})
COMMAND_CODEC_IDS = frozenset({0x0C, 0x0D, 0x0E})
ZERO4 = b"\x00\x00\x00\x00"
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
UDP_ACK = struct.Struct(">HHBBB")
_MAX_IOS = 250


# --------------------------------------------------------------------------- configuration


@attrs.frozen
class SimConfig:
    """What to simulate. ``packets`` is per device; ``None`` = until ``duration`` ends."""

    host: str = "127.0.0.1"
    port: int = 5027
    devices: int = 1
    records: int = 1
    codec: str = CODEC_8E  # "8" | "8E" | "16" | "mix" (devices take turns)
    ios: int = 22
    rate: float = 0.0  # packets per second per device; 0 = back-to-back
    duration: float | None = None
    packets: int | None = None
    ramp_up: float = 0.0
    udp: bool = False
    udp_port: int | None = None
    answer_commands: bool = False
    imei_base: int = 35_000_000_000_000  # 14 digits; device i: base + i, then a Luhn digit
    ack_timeout: float = 10.0
    connect_timeout: float = 10.0
    reconnect_delay: float = 1.0
    max_time: float | None = None  # hard stop of the whole run (None: derived)
    templates: int = 8  # distinct frames per codec (devices share them)
    seed: int = 1
    progress_interval: float = 1.0
    # Multi-process runs: this process simulates devices first_device .. first_device +
    # devices - 1 out of total_devices (ramp-up and paced phases use the global index).
    first_device: int = 0
    total_devices: int | None = None
    # Bind device i to loopback address number i % source_addresses (127.0.1.1, 127.0.1.2,
    # ...): each source address has its own ~28,000 ephemeral ports. 0: let the kernel pick.
    source_addresses: int = 0

    def validate(self) -> None:
        if self.devices < 0:
            raise ValueError("--devices must be >= 0")
        if not 1 <= self.records <= 255:
            raise ValueError("--records must be 1..255 (a packet carries at most 255)")
        if self.codec not in CODEC_CHOICES:
            raise ValueError(f"--codec must be one of {', '.join(CODEC_CHOICES)}")
        if not 0 <= self.ios <= _MAX_IOS:
            raise ValueError(f"--ios must be 0..{_MAX_IOS}")
        if self.rate < 0:
            raise ValueError("--rate must be >= 0")
        if self.duration is None and self.packets is None:
            raise ValueError("give --duration or --packets (or both)")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be > 0")
        if self.packets is not None and self.packets < 0:
            raise ValueError("--packets must be >= 0")
        if self.ramp_up < 0:
            raise ValueError("--ramp-up must be >= 0")
        if self.ack_timeout <= 0:
            raise ValueError("--ack-timeout must be > 0")
        if self.udp and not self.udp_port:
            raise ValueError("--udp needs --udp-port")
        if not 0 <= self.imei_base <= 99_999_999_999_999:
            raise ValueError("--imei-base must have at most 14 digits")
        if not 0 <= self.source_addresses <= MAX_SOURCE_ADDRESSES:
            raise ValueError(f"--source-addresses must be 0..{MAX_SOURCE_ADDRESSES}")
        if self.source_addresses and not self.host.startswith("127."):
            raise ValueError("--source-addresses binds to 127.x.y.z: only for a 127.x --host")
        if self.imei_base + self.first_device + self.devices > 99_999_999_999_999 + 1:
            raise ValueError("--imei-base too large for that many devices")

    @property
    def effective_max_time(self) -> float:
        if self.max_time is not None:
            return self.max_time
        if self.duration is not None:
            return self.ramp_up + self.duration + self.ack_timeout + 30.0
        return 600.0


#: 127.0.b.c with b, c in 1..254
MAX_SOURCE_ADDRESSES = 254 * 254


def source_address(number: int) -> str:
    """Loopback source address ``number`` (0-based): 127.0.1.1, 127.0.1.2, ... 127.0.1.254,
    127.0.2.1, ... (no .0 or .255 octets). Linux answers all of 127.0.0.0/8 on ``lo``."""
    return f"127.0.{1 + number // 254}.{1 + number % 254}"


def imei_for(base: int, index: int) -> str:
    """Device ``index``'s IMEI: 14 digits ``base + index`` and the Luhn digit."""
    body = f"{base + index:014d}"
    return body + str(luhn_digit(body))


# --------------------------------------------------------------------------- packets

# IO elements of a typical FMB configuration, most common first: (id, width in bytes).
# The first 22 are 9 x 1-byte, 7 x 2-byte, 4 x 4-byte and 2 x 8-byte values.
_FMB_IOS: tuple[tuple[int, int], ...] = (
    (239, 1),  # ignition
    (240, 1),  # movement
    (21, 1),  # GSM signal
    (24, 2),  # speed
    (66, 2),  # external voltage (mV)
    (67, 2),  # battery voltage (mV)
    (16, 4),  # total odometer (m)
    (78, 8),  # iButton
    (200, 1),  # sleep mode
    (69, 1),  # GNSS status
    (181, 2),  # GNSS PDOP
    (182, 2),  # GNSS HDOP
    (68, 2),  # battery current (mA)
    (241, 4),  # active GSM operator
    (1, 1),  # DIN1
    (179, 1),  # DOUT1
    (113, 1),  # battery level (%)
    (80, 1),  # data mode
    (205, 2),  # GSM cell id
    (199, 4),  # trip odometer (m)
    (12, 4),  # fuel used GPS
    (11, 8),  # ICCID1
    (206, 2),  # GSM area code
    (9, 2),  # AIN1
    (2, 1),  # DIN2
    (13, 2),  # fuel rate GPS
    (14, 8),  # ICCID2
    (17, 2),  # axis X
    (18, 2),  # axis Y
    (19, 2),  # axis Z
    (15, 2),  # eco score
    (238, 8),  # user id
)


def _io_set(count: int) -> list[tuple[int, int]]:
    """``count`` distinct (id, width) pairs: the FMB list, then made-up ids below 256."""
    ios = list(_FMB_IOS[:count])
    used = {io_id for io_id, _ in _FMB_IOS}
    spare = (i for i in range(30, 256) if i not in used)
    widths = (1, 2, 4, 1, 2, 8)
    while len(ios) < count:
        ios.append((next(spare), widths[len(ios) % len(widths)]))
    return ios


def _io_value(io_id: int, width: int, rnd: random.Random, index: int) -> int:
    if io_id in (239, 240):
        return 1
    if io_id == 21:
        return rnd.randint(2, 5)
    if io_id == 66:
        return rnd.randint(12_000, 14_400)
    if io_id == 67:
        return rnd.randint(3_900, 4_150)
    if io_id in (16, 199):
        return 1_250_000 + index * 137
    if io_id == 241:
        return 24_602
    if io_id == 113:
        return rnd.randint(60, 100)
    if width == 8:
        return rnd.getrandbits(64)  # half of them above 2^63: exercises __bigint
    return rnd.getrandbits(8 * width)


def build_packet(codec: str, records: int, ios: int, rnd: random.Random) -> AvlPacket:
    """A realistic packet: ``records`` records of ``ios`` IO elements each, positions
    along a short track near Vilnius. Timestamps are placeholders (patched per packet)."""
    io_set = _io_set(ios)
    lon = 252_793_217 + rnd.randint(-500_000, 500_000)
    lat = 546_872_135 + rnd.randint(-500_000, 500_000)
    out = []
    for index in range(records):
        groups: dict[int, dict[int, int]] = {1: {}, 2: {}, 4: {}, 8: {}}
        for io_id, width in io_set:
            groups[width][io_id] = _io_value(io_id, width, rnd, index)
        speed = rnd.randint(0, 90)
        if 24 in groups[2]:
            groups[2][24] = speed
        lon += rnd.randint(-300, 300)
        lat += rnd.randint(-300, 300)
        out.append(
            AvlRecord(
                timestamp_ms=1_700_000_000_000 + index,
                priority=0,
                longitude=lon,
                latitude=lat,
                altitude=rnd.randint(90, 140),
                angle=rnd.randint(0, 359),
                satellites=rnd.randint(7, 14),
                speed=speed,
                event_io_id=0,
                generation_type=7 if codec == CODEC_16 else None,  # periodical
                io1=groups[1],
                io2=groups[2],
                io4=groups[4],
                io8=groups[8],
            )
        )
    return AvlPacket(codec, tuple(out))


def _record_offsets(packet: AvlPacket) -> list[int]:
    """Offsets of each record's timestamp in the packet's data field."""
    offsets = []
    at = 2  # codec id, number of data 1
    for record in packet.records:
        offsets.append(at)
        at += len(encode_avl_data(AvlPacket(packet.codec, (record,)))) - 3
    return offsets


class FrameTemplate:
    """A TCP frame whose record timestamps (and CRC) are patched for each new packet."""

    __slots__ = ("_buf", "_crc_at", "_ts_offsets", "codec", "count", "size")

    def __init__(self, packet: AvlPacket) -> None:
        data = encode_avl_data(packet)
        self._buf = bytearray(wrap_frame(data))
        self._ts_offsets = tuple(8 + off for off in _record_offsets(packet))
        self._crc_at = len(self._buf) - 4
        self.codec = packet.codec
        self.count = len(packet.records)
        self.size = len(self._buf)

    def build(self, first_ts_ms: int) -> bytes:
        """The frame with record *i* stamped ``first_ts_ms + i`` (1 ms apart)."""
        buf = self._buf
        pack_into = _U64.pack_into
        ts = first_ts_ms
        for offset in self._ts_offsets:
            pack_into(buf, offset, ts)
            ts += 1
        crc_at = self._crc_at
        crc = crc16_ibm(memoryview(buf)[8:crc_at])  # type: ignore[arg-type]
        _U32.pack_into(buf, crc_at, crc)
        return bytes(buf)


class UdpTemplate:
    """A UDP datagram whose packet ids and record timestamps are patched per packet."""

    __slots__ = ("_buf", "_ts_offsets", "codec", "count", "size")

    def __init__(self, packet: AvlPacket, imei: str) -> None:
        self._buf = bytearray(encode_udp_datagram(UdpPacket(0, 0, imei, packet)))
        data_at = len(self._buf) - len(encode_avl_data(packet))
        self._ts_offsets = tuple(data_at + off for off in _record_offsets(packet))
        self.codec = packet.codec
        self.count = len(packet.records)
        self.size = len(self._buf)

    def build(self, first_ts_ms: int, packet_id: int, avl_packet_id: int) -> bytes:
        buf = self._buf
        _U16.pack_into(buf, 2, packet_id)
        buf[5] = avl_packet_id
        ts = first_ts_ms
        for offset in self._ts_offsets:
            _U64.pack_into(buf, offset, ts)
            ts += 1
        return bytes(buf)
