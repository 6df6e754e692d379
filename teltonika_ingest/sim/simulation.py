"""Simulated Teltonika devices: load generator and replay of captured frames.

Every simulated device behaves like a real tracker (protocol.md §1, §4): it connects,
sends its IMEI handshake, waits for ``01``, then sends AVL packets one at a time, each
only after the ACK of the previous one. A packet that gets no ACK within the ACK
timeout (or a wrong count, or a dropped connection) is sent again, byte for byte,
after reconnecting. Devices can answer Codec 12/14 GPRS commands.

Cheap per packet, so that the simulator is not what a benchmark measures:

* frames are encoded once per *template* (a few per codec, shared by devices); a new
  packet copies its template's bytes after patching the record timestamps and the CRC
  in place (``FrameTemplate.build``: ~3 µs for 10 records);
* one reactor, no per-packet timers: ACK and handshake timeouts are found by one
  periodic sweep; paced devices use one ``callLater`` per packet;
* latencies go into a log-linear histogram (``LatencyHistogram``: exact to 1 µs below
  1 ms, 1 % above), which also merges across processes.

Timeline of a run (seconds after start): device *i* of *N* connects at
``ramp_up * i / N``; back-to-back devices send as soon as their handshake is accepted;
paced devices (``rate`` > 0) send their first packet at ``ramp_up + (i / N) / rate``
(start times spread over the first period after the ramp-up) and then every
``1 / rate`` s. With a ``duration``, sending stops at ``ramp_up + duration``; the
*steady window* is ``[ramp_up, ramp_up + duration]``: rates and the "steady" latency
percentiles count only that window, so connection storms do not pollute them.
With ``packets``, each device stops after that many ACKed packets.

This module never prints: progress goes to a callback, results are plain dicts.
"""

from __future__ import annotations

import enum
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from teltonika_ingest.codec import (
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_14,
    CODEC_16,
    CODEC_IDS,
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    AvlPacket,
    AvlRecord,
    CodecError,
    CommandMessage,
    UdpPacket,
    crc16_ibm,
    decode_command_frame,
    decode_udp_datagram,
    encode_avl_data,
    encode_command_message,
    encode_imei,
    encode_udp_datagram,
    wrap_frame,
)
from teltonika_ingest.codec.imei import luhn_digit

__all__ = [
    "CODEC_CHOICES",
    "FrameTemplate",
    "LatencyHistogram",
    "ReplayItem",
    "SimConfig",
    "Simulation",
    "UdpTemplate",
    "build_packet",
    "default_answer",
    "imei_for",
    "luhn_digit",
    "merge_summaries",
    "parse_replay",
    "replay",
]

CODEC_CHOICES = ("8", "8E", "16", "mix")
_AVL_CODEC_IDS = frozenset({0x08, 0x8E, 0x10})
_COMMAND_CODEC_IDS = frozenset({0x0C, 0x0D, 0x0E})
_ZERO4 = b"\x00\x00\x00\x00"
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_UDP_ACK = struct.Struct(">HHBBB")
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
        if self.imei_base + self.first_device + self.devices > 99_999_999_999_999 + 1:
            raise ValueError("--imei-base too large for that many devices")

    @property
    def effective_max_time(self) -> float:
        if self.max_time is not None:
            return self.max_time
        if self.duration is not None:
            return self.ramp_up + self.duration + self.ack_timeout + 30.0
        return 600.0


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


# --------------------------------------------------------------------------- statistics


class LatencyHistogram:
    """Log-linear histogram of latencies in µs: exact below 1 ms, then 3 significant
    digits (at most 1 % above the true value, as quantiles report the bucket's top)."""

    __slots__ = ("counts", "max_us", "n", "total_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total_us = 0
        self.max_us = 0

    def add(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        if us < 1_000:
            key = us
        elif us < 10_000:
            key = us - us % 10
        elif us < 100_000:
            key = us - us % 100
        elif us < 1_000_000:
            key = us - us % 1_000
        else:
            key = us - us % 10_000
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.n += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    @staticmethod
    def _width(key: int) -> int:
        if key < 1_000:
            return 1
        if key < 10_000:
            return 10
        if key < 100_000:
            return 100
        if key < 1_000_000:
            return 1_000
        return 10_000

    def quantile_us(self, q: float) -> int:
        """The ``q`` quantile (0..1): the top of the bucket holding it; 0 when empty."""
        if not self.n:
            return 0
        rank = max(1, int(q * self.n + 0.999999))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min(key + self._width(key) - 1, self.max_us)
        return self.max_us

    def merge(self, other: LatencyHistogram) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.n += other.n
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def summary_ms(self) -> dict[str, float | int]:
        ms = 1000.0
        return {
            "count": self.n,
            "p50": self.quantile_us(0.50) / ms,
            "p95": self.quantile_us(0.95) / ms,
            "p99": self.quantile_us(0.99) / ms,
            "max": self.max_us / ms,
            "mean": (self.total_us / self.n / ms) if self.n else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
            "n": self.n,
            "total_us": self.total_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyHistogram:
        hist = cls()
        hist.counts = {int(k): int(v) for k, v in data.get("counts", {}).items()}
        hist.n = int(data.get("n", 0))
        hist.total_us = int(data.get("total_us", 0))
        hist.max_us = int(data.get("max_us", 0))
        return hist


class Stats:
    """Counters of one simulation (all devices)."""

    COUNTERS = (
        "connects",
        "reconnects",
        "handshakes",
        "packets_sent",
        "records_sent",
        "resends",
        "packets_acked",
        "records_acked",
        "late_sends",
        "commands_received",
        "commands_answered",
    )

    def __init__(self) -> None:
        self.connects = 0
        self.reconnects = 0
        self.handshakes = 0
        self.packets_sent = 0
        self.records_sent = 0
        self.resends = 0
        self.packets_acked = 0
        self.records_acked = 0
        self.late_sends = 0
        self.commands_received = 0
        self.commands_answered = 0
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.steady_latency = LatencyHistogram()

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


# --------------------------------------------------------------------------- devices


class DeviceState(enum.IntEnum):
    WAITING = 0  # not connected, nothing scheduled (before start, or done)
    CONNECTING = 1
    HANDSHAKE = 2  # IMEI sent, waiting for 01/00
    READY = 3  # connected, no packet in flight
    AWAITING_ACK = 4


_WAITING = DeviceState.WAITING
_CONNECTING = DeviceState.CONNECTING
_HANDSHAKE = DeviceState.HANDSHAKE
_READY = DeviceState.READY
_AWAITING_ACK = DeviceState.AWAITING_ACK


class _Device:
    """What TCP and UDP devices share: the packet schedule and ACK bookkeeping."""

    sim: Simulation
    template: Any  # FrameTemplate | UdpTemplate
    index: int
    imei: str
    state: DeviceState
    pending: bytes | None
    pending_count: int
    sent_at: float
    done: int
    next_due: float
    timer: Any  # IDelayedCall | None
    last_ts: int
    finished: bool

    def _init_device(self, sim: Simulation, index: int, imei: str) -> None:
        self.sim = sim
        self.index = index
        self.imei = imei
        self.state = _WAITING
        self.pending = None  # the packet awaiting its ACK (resent as is)
        self.pending_count = 0
        self.sent_at = 0.0
        self.done = 0  # packets ACKed
        self.next_due = 0.0  # paced: when the next packet is due (reactor time)
        self.timer = None
        self.last_ts = 0
        self.pending_ts = 0  # timestamp of the first record of the packet in flight
        self.finished = False

    # -- schedule

    def _next(self) -> None:
        """Ready for a new packet: send it now, schedule it, or finish."""
        sim = self.sim
        if sim.sending_stopped:
            self._finish()
            return
        limit = sim.packets_limit
        if limit is not None and self.done >= limit:
            self._finish()
            return
        period = sim.period
        if period:
            now = sim.clock.seconds()
            due = self.next_due
            if due >= sim.stop_wall:
                self._finish()  # the next slot is past the end of the run
                return
            if due > now:
                self.timer = sim.clock.callLater(due - now, self._due)
                return
            if now - due > period:
                # More than a period late: do not burst to catch up, as a device would not.
                sim.stats.late_sends += 1
                self.next_due = now + period
            else:
                self.next_due = due + period
        self._send_new()

    def _due(self) -> None:
        self.timer = None
        if self.state is _READY:
            self._next()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.sim._device_finished()

    def _new_ts(self) -> int:
        now_ms = int(time.time() * 1000)
        count = self.sim.records
        first = now_ms - count + 1
        if first <= self.last_ts:
            first = self.last_ts + 1
        self.last_ts = first + count - 1
        self.pending_ts = first
        return first

    def _acked(self, count: int) -> None:
        sim = self.sim
        stats = sim.stats
        latency = time.perf_counter() - self.sent_at
        if count != self.pending_count:
            stats.error("ack_count_mismatch")
            self._drop()  # a wrong count is no ACK: resend (after reconnecting, over TCP)
            return
        stats.packets_acked += 1
        stats.records_acked += count
        if sim.on_ack is not None:  # record i of the packet is stamped pending_ts + i
            sim.on_ack(self.imei, self.pending_ts, count)
        stats.latency.add(latency)
        if sim.steady_from <= self.sent_at < sim.steady_until:
            stats.steady_latency.add(latency)
        sim.interval_latencies.append(latency)
        self.pending = None
        self.done += 1
        self.state = _READY
        self._next()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    # -- implemented per transport

    def _send_new(self) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    def sweep(self, now: float, timeout: float) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when nothing is queued.

    Twisted queues every write until the next reactor turn (an epoll registration, a
    write event and an unregistration per packet: about a third of the simulator's cost
    per packet). With an empty queue the bytes go straight to the socket; whatever the
    socket does not take, and every error, goes the ordinary way.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # let Twisted find and report the error
        return
    if sent < len(data):
        transport.write(data[sent:])


class _DeviceProtocol(protocol.Protocol):
    device: TcpDevice
    transport: Any  # ITCPTransport once connected

    def connectionMade(self) -> None:
        self.device.connected(self)

    def dataReceived(self, data: bytes) -> None:
        device = self.device
        # Fast path: a whole ACK, alone, while one is expected.
        if device.state is _AWAITING_ACK and len(data) == 4 and not device.rbuf and data != _ZERO4:
            device._acked(int.from_bytes(data, "big"))
            return
        device.received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.device.lost(self, reason)


class TcpDevice(_Device, protocol.ClientFactory):
    """One device over TCP; it is also the factory of its successive connections."""

    noisy = False

    def __init__(self, sim: Simulation, index: int, imei: str, template: FrameTemplate) -> None:
        self._init_device(sim, index, imei)
        self.template = template
        self.handshake = encode_imei(imei)
        self.proto: _DeviceProtocol | None = None
        self.connector: Any = None
        self.rbuf = bytearray()
        self.handshake_sent_at = 0.0
        self.ever_connected = False
        self.handshaken = False
        self.dropping = False  # we closed it (timeout, bad ACK): no "closed by server" error

    # -- connection

    def start(self) -> None:
        self.connect()

    def connect(self) -> None:
        sim = self.sim
        self.timer = None
        if sim.closing or sim.sending_stopped or self.state is not _WAITING:
            return
        self.state = _CONNECTING
        sim.connecting += 1
        self.connector = sim.reactor.connectTCP(
            sim.config.host, sim.config.port, self, timeout=sim.config.connect_timeout
        )

    def buildProtocol(self, addr: Any) -> _DeviceProtocol:
        proto = _DeviceProtocol()
        proto.device = self
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        sim = self.sim
        sim.connecting -= 1
        self.connector = None
        self.state = _WAITING
        if sim.closing:
            sim._connection_gone()
            return
        sim.stats.error("connect_failed")
        self._reconnect_later()

    def connected(self, proto: _DeviceProtocol) -> None:
        sim = self.sim
        sim.connecting -= 1
        sim.open_connections += 1
        self.connector = None
        self.proto = proto
        sim.stats.connects += 1
        if self.ever_connected:
            sim.stats.reconnects += 1
        self.ever_connected = True
        if sim.closing:
            proto.transport.loseConnection()
            return
        self.rbuf.clear()
        self.state = _HANDSHAKE
        self.handshake_sent_at = time.perf_counter()
        proto.transport.write(self.handshake)

    def lost(self, proto: _DeviceProtocol, reason: Failure) -> None:
        sim = self.sim
        if proto is not self.proto:
            return
        self.proto = None
        sim.open_connections -= 1
        if self.handshaken:
            self.handshaken = False
            sim.handshaken -= 1
        state = self.state
        self.state = _WAITING
        self._cancel_timer()
        dropping, self.dropping = self.dropping, False
        if sim.closing:
            sim._connection_gone()
            return
        if dropping:
            pass
        elif state is _AWAITING_ACK:
            sim.stats.error("closed_awaiting_ack")
        elif state is _HANDSHAKE:
            sim.stats.error("closed_in_handshake")
        elif not self.finished:
            sim.stats.error("closed_by_server")
        if not self.finished or self.pending is not None:
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        sim = self.sim
        if sim.closing or sim.sending_stopped:
            return
        delay = sim.config.reconnect_delay * (0.5 + sim.rnd.random())
        self.timer = sim.clock.callLater(delay, self.connect)

    def _drop(self) -> None:
        """Give up on this connection (the device reconnects and resends)."""
        if self.proto is not None and self.proto.transport is not None:
            self.dropping = True
            self.proto.transport.abortConnection()

    def close(self) -> None:
        self._cancel_timer()
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()
        elif self.connector is not None and self.state is _CONNECTING:
            self.connector.stopConnecting()

    # -- sending

    def _send_new(self) -> None:
        self.pending = self.template.build(self._new_ts())
        self.pending_count = self.template.count
        self._send_pending()

    def _send_pending(self) -> None:
        proto = self.proto
        assert proto is not None and self.pending is not None
        stats = self.sim.stats
        self.state = _AWAITING_ACK
        self.sent_at = time.perf_counter()
        write_now(proto.transport, self.pending)
        stats.packets_sent += 1
        stats.records_sent += self.pending_count

    # -- receiving

    def received(self, data: bytes) -> None:
        buf = self.rbuf
        buf += data
        while buf:
            state = self.state
            if state is _HANDSHAKE:
                reply = buf[0]
                del buf[0]
                self._handshake_reply(reply)
                continue
            if buf[:4] == _ZERO4:
                # A server -> device command frame, or (only when an ACK is due) a zero ACK.
                if len(buf) < 9:
                    if state is _AWAITING_ACK and len(buf) >= 4:
                        # Ambiguous until byte 9 arrives; a real zero ACK is answered by
                        # the ACK timeout (a zero count is never the count we sent).
                        pass
                    return
                if buf[8] in _COMMAND_CODEC_IDS:
                    size = 12 + int.from_bytes(buf[4:8], "big")
                    if size > 1 << 20:
                        self.sim.stats.error("bad_server_frame")
                        buf.clear()
                        self._drop()
                        return
                    if len(buf) < size:
                        return
                    frame = bytes(buf[:size])
                    del buf[:size]
                    self._command(frame)
                    continue
                if state is not _AWAITING_ACK:
                    self.sim.stats.error("unexpected_data")
                    buf.clear()
                    return
            if state is _AWAITING_ACK:
                if len(buf) < 4:
                    return
                count = int.from_bytes(buf[:4], "big")
                del buf[:4]
                self._acked(count)
                continue
            self.sim.stats.error("unexpected_data")
            buf.clear()
            return

    def _handshake_reply(self, reply: int) -> None:
        sim = self.sim
        if reply != 1:
            sim.stats.error("handshake_rejected")
            self._drop()
            return
        sim.stats.handshakes += 1
        self.handshaken = True
        sim.handshaken += 1
        self.state = _READY
        if self.pending is not None:
            sim.stats.resends += 1
            self._send_pending()
        elif self.finished:
            return
        else:
            self._next()

    def _command(self, frame: bytes) -> None:
        sim = self.sim
        sim.stats.commands_received += 1
        try:
            message = decode_command_frame(frame)
        except CodecError:
            sim.stats.error("bad_command_frame")
            return
        if sim.on_command is not None:
            sim.on_command(self.imei, message)
        if not sim.config.answer_commands or message.type != TYPE_COMMAND:
            return
        reply = answer_command(message, self.imei, sim.answer)
        if reply is not None and self.proto is not None and self.proto.transport is not None:
            self.proto.transport.write(reply)
            sim.stats.commands_answered += 1

    def sweep(self, now: float, timeout: float) -> None:
        state = self.state
        if state is _AWAITING_ACK:
            if now - self.sent_at > timeout:
                self.sim.stats.error("ack_timeout")
                self._drop()
        elif state is _HANDSHAKE and now - self.handshake_sent_at > timeout:
            self.sim.stats.error("handshake_timeout")
            self._drop()


class UdpDevice(_Device, protocol.DatagramProtocol):
    """One device over UDP: a datagram per packet, resent until its ACK arrives."""

    noisy = False
    transport: Any

    def __init__(self, sim: Simulation, index: int, imei: str, template: UdpTemplate) -> None:
        self._init_device(sim, index, imei)
        self.template = template
        self.port: Any = None
        self.seq = 0

    def start(self) -> None:
        sim = self.sim
        if sim.closing or sim.sending_stopped:
            return
        self.port = sim.reactor.listenUDP(0, self)
        self.transport.connect(sim.udp_host, sim.udp_port)
        sim.stats.connects += 1
        self.state = _READY
        self._next()

    def _send_new(self) -> None:
        seq = self.seq
        self.seq = seq + 1
        self.pending = self.template.build(self._new_ts(), seq & 0xFFFF, seq & 0xFF)
        self.pending_count = self.template.count
        self._send_pending()

    def _send_pending(self) -> None:
        assert self.pending is not None
        stats = self.sim.stats
        self.state = _AWAITING_ACK
        self.sent_at = time.perf_counter()
        self.transport.write(self.pending)
        stats.packets_sent += 1
        stats.records_sent += self.pending_count

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) != 7 or self.state is not _AWAITING_ACK or self.pending is None:
            self.sim.stats.error("unexpected_datagram")
            return
        _length, _packet_id, _one, avl_id, count = _UDP_ACK.unpack(datagram)
        if avl_id != self.pending[5]:
            self.sim.stats.error("stale_udp_ack")
            return
        self._acked(count)

    def connectionRefused(self) -> None:
        self.sim.stats.error("udp_refused")

    def _drop(self) -> None:
        # UDP has no connection: resend at once (a real device retries the datagram).
        if self.pending is not None and not self.sim.closing:
            self.sim.stats.resends += 1
            self._send_pending()

    def sweep(self, now: float, timeout: float) -> None:
        if self.state is _AWAITING_ACK and now - self.sent_at > timeout:
            self.sim.stats.error("ack_timeout")
            self._drop()

    def close(self) -> None:
        self._cancel_timer()
        if self.port is not None:
            self.port.stopListening()
            self.port = None


# --------------------------------------------------------------------------- commands

_CANNED_ANSWERS = {
    "getver": "Ver:03.28.07_00 GPS:AXN_5.10 Hw:FMB920 Mod:13 IMEI:{imei} Init:2024-1-1 0:0 "
    "Uptime:3600 MAC:0 SPC:1(0) AXL:0 OBD:0 BL:1.10 BT:4",
    "getstatus": "Data Link: 1 GPRS: 1 Phone: 0 SIM: 0 OP: 24602 Signal: 5 NewSMS: 0 Roaming: 0 "
    "SMSFull: 0 LAC: 1 Cell ID: 1 NetType: 1 FwUpd:-1",
    "getgps": "GPS:1 Sat:9 Lat:54.687213 Long:25.279321 Alt:112 Speed:42 Dir:270 Date: 2024/1/1 "
    "Time: 0:0:0",
    "getinfo": "RTC:2024/1/1 0:0 Init:2024/1/1 0:0 UpTime:3600s PWR:PwrVoltage RST:0 GPS:3 SAT:9 "
    "TTFF:30 TTLF:1 NOGPS:0:0 SR:0 FG:0 FL:0 SMS:0 REC:0 MD:1 DB:0",
}


def default_answer(text: str, imei: str) -> bytes:
    """What a simulated device answers to a GPRS command (canned FMB-like texts)."""
    word = text.strip().split(" ", 1)[0].lower()
    canned = _CANNED_ANSWERS.get(word)
    if canned is not None:
        return canned.format(imei=imei).encode("ascii")
    return f"{text.strip()}: OK".encode("ascii", "replace")


def answer_command(
    message: CommandMessage, imei: str, answer: Callable[[str, str], bytes]
) -> bytes | None:
    """The device's reply frame to a Codec 12/14 command, or None (not a command)."""
    if message.type != TYPE_COMMAND:
        return None
    if message.codec == CODEC_12:
        reply = CommandMessage(CODEC_12, TYPE_RESPONSE, answer(message.text, imei))
    elif message.codec == CODEC_14:
        if message.imei != imei:
            reply = CommandMessage(CODEC_14, TYPE_NACK, b"", imei)
        else:
            reply = CommandMessage(CODEC_14, TYPE_RESPONSE, answer(message.text, imei), imei)
    else:
        return None
    return encode_command_message(reply)


# --------------------------------------------------------------------------- the run


class Simulation:
    """Many devices on one reactor. ``run()`` fires with the summary dict."""

    def __init__(
        self,
        config: SimConfig,
        *,
        reactor: Any = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        on_command: Callable[[str, CommandMessage], None] | None = None,
        on_ack: Callable[[str, int, int], None] | None = None,
        answer: Callable[[str, str], bytes] = default_answer,
    ) -> None:
        config.validate()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.progress = progress
        self.on_command = on_command
        #: called with (imei, first record timestamp ms, record count) for every ACKed packet
        self.on_ack = on_ack
        self.answer = answer
        self.rnd = random.Random(config.seed + config.first_device)
        self.stats = Stats()
        self.records = config.records
        self.period = 1.0 / config.rate if config.rate > 0 else 0.0
        self.packets_limit = config.packets
        self.sending_stopped = False
        self.closing = False
        self.connecting = 0
        self.open_connections = 0
        self.handshaken = 0
        self.finished_devices = 0
        self.interval_latencies: list[float] = []
        self.steady_from = 0.0  # perf_counter bounds of the steady window
        self.steady_until = float("inf")
        self.stop_wall = float("inf")  # reactor time when sending stops (with a duration)
        self.udp_host = ""
        self.udp_port = config.udp_port or 0
        self.devices: list[_Device] = []
        self._result: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._calls: list[Any] = []  # IDelayedCall
        self._loops: list[LoopingCall] = []
        self._started_wall = 0.0
        self._started_perf = 0.0
        self._stopped_perf: float | None = None
        self._steady_start_counts: dict[str, int] | None = None
        self._steady_end_counts: dict[str, int] | None = None
        self._last_tick: tuple[float, int, int] = (0.0, 0, 0)
        self._close_deadline: Any = None  # IDelayedCall | None
        self.incomplete = False
        self._build_devices()

    # -- set-up

    def _codec_of(self, global_index: int) -> str:
        if self.config.codec == "mix":
            return (CODEC_8, CODEC_8E, CODEC_16)[global_index % 3]
        return self.config.codec

    def _build_devices(self) -> None:
        config = self.config
        if config.udp:
            self.udp_host = socket.gethostbyname(config.host)
        rnd = random.Random(config.seed)
        ios = config.ios
        packets: dict[str, list[AvlPacket]] = {}
        codecs = {self._codec_of(i) for i in range(3)} if config.codec == "mix" else {config.codec}
        count = max(1, min(config.templates, config.devices))
        for codec in sorted(codecs):
            packets[codec] = [build_packet(codec, config.records, ios, rnd) for _ in range(count)]
        tcp_templates = {
            codec: [FrameTemplate(p) for p in plist] for codec, plist in packets.items()
        }
        for local in range(config.devices):
            index = config.first_device + local
            imei = imei_for(config.imei_base, index)
            codec = self._codec_of(index)
            slot = (index // (3 if config.codec == "mix" else 1)) % count
            device: _Device
            if config.udp:
                device = UdpDevice(self, index, imei, UdpTemplate(packets[codec][slot], imei))
            else:
                device = TcpDevice(self, index, imei, tcp_templates[codec][slot])
            self.devices.append(device)

    @property
    def frame_sizes(self) -> list[int]:
        return sorted({d.template.size for d in self.devices})

    # -- run

    def run(self) -> defer.Deferred[dict[str, Any]]:
        config = self.config
        clock = self.clock
        total = config.total_devices or config.devices
        self._started_wall = clock.seconds()
        self._started_perf = time.perf_counter()
        self.steady_from = self._started_perf + config.ramp_up
        period = self.period
        for device in self.devices:
            share = device.index / total if total else 0.0
            device.next_due = self._started_wall + config.ramp_up + share * period
            self._calls.append(clock.callLater(config.ramp_up * share, device.start))
        if config.duration is not None:
            stop_at = config.ramp_up + config.duration
            self.stop_wall = self._started_wall + stop_at
            self._calls.append(clock.callLater(stop_at, self._stop_sending))
        if config.ramp_up > 0:
            self._calls.append(clock.callLater(config.ramp_up, self._steady_begins))
        else:
            self._steady_start_counts = self._counts()
        self._calls.append(clock.callLater(config.effective_max_time, self._overtime))
        sweep_every = max(0.05, min(1.0, config.ack_timeout / 5))
        self._start_loop(self._sweep, sweep_every)
        if self.progress is not None and config.progress_interval > 0:
            self._last_tick = (self._started_perf, 0, 0)
            self._start_loop(self._tick, config.progress_interval, now=False)
        if not self.devices:
            self._calls.append(clock.callLater(0, self._stop_sending))
        return self._result

    def _start_loop(self, fn: Callable[[], None], interval: float, now: bool = True) -> None:
        loop = LoopingCall(fn)
        loop.clock = self.clock
        self._loops.append(loop)
        loop.start(interval, now=now)

    def _counts(self) -> dict[str, int]:
        stats = self.stats
        return {
            "packets_acked": stats.packets_acked,
            "records_acked": stats.records_acked,
            "perf": int(time.perf_counter() * 1e6),
        }

    def _steady_begins(self) -> None:
        self._steady_start_counts = self._counts()

    def _sweep(self) -> None:
        now = time.perf_counter()
        timeout = self.config.ack_timeout
        for device in self.devices:
            if device.state >= _HANDSHAKE:
                device.sweep(now, timeout)

    def _tick(self) -> None:
        now = time.perf_counter()
        stats = self.stats
        last_t, last_packets, last_records = self._last_tick
        span = max(now - last_t, 1e-9)
        lats = sorted(self.interval_latencies)
        self.interval_latencies = []
        p99 = lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1000 if lats else 0.0
        assert self.progress is not None
        self.progress(
            {
                "t": round(now - self._started_perf, 3),
                "devices": len(self.devices),
                "connected": self.handshaken,
                "packets_acked": stats.packets_acked,
                "records_acked": stats.records_acked,
                "packets_per_s": (stats.packets_acked - last_packets) / span,
                "records_per_s": (stats.records_acked - last_records) / span,
                "p99_ms": p99,
                "reconnects": stats.reconnects,
                "errors": sum(stats.errors.values()),
            }
        )
        self._last_tick = (now, stats.packets_acked, stats.records_acked)

    def _device_finished(self) -> None:
        self.finished_devices += 1
        if (
            self.config.duration is None
            and self.finished_devices >= len(self.devices)
            and not self.closing
        ):
            self._stop_sending()

    def _stop_sending(self) -> None:
        if self.sending_stopped:
            return
        self.sending_stopped = True
        self._stopped_perf = time.perf_counter()
        self.steady_until = self._stopped_perf
        self._steady_end_counts = self._counts()
        if self._steady_start_counts is None:
            self._steady_start_counts = {"packets_acked": 0, "records_acked": 0, "perf": 0}
        for device in self.devices:
            if device.state is not _AWAITING_ACK:
                device._cancel_timer()
        if not self.closing:
            self._start_loop(self._check_drained, 0.02)

    def _check_drained(self) -> None:
        """After sending stopped: close once no packet awaits its ACK (or past the timeout)."""
        if self.closing:
            return
        if not any(d.state is _AWAITING_ACK for d in self.devices):
            self._close_all()
        elif self._stopped_perf is not None and (
            time.perf_counter() - self._stopped_perf > self.config.ack_timeout
        ):
            self.incomplete = True
            self._close_all()

    def stop(self) -> None:
        """Stop sending now; close once in-flight packets are ACKed (again: close now)."""
        if not self.sending_stopped:
            self._stop_sending()
        elif not self.closing:
            self.incomplete = True
            self._close_all()

    def _overtime(self) -> None:
        if not self.closing:
            self.incomplete = True
            self._stop_sending()
            self._close_all()

    def _close_all(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._stopped_perf is None:
            self._stop_sending()
        self._ended_perf = time.perf_counter()
        for call in self._calls:
            if call.active():
                call.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.progress is not None:
            self._tick()
        for device in self.devices:
            device.close()
        self._close_deadline = self.clock.callLater(5.0, self._abort_rest)
        self._connection_gone()

    def _abort_rest(self) -> None:
        self._close_deadline = None
        for device in self.devices:
            proto = getattr(device, "proto", None)
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
        self._complete()

    def _connection_gone(self) -> None:
        if self.closing and self.open_connections <= 0 and self.connecting <= 0:
            self._complete()

    def _complete(self) -> None:
        if self._result.called:
            return
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._result.callback(self.summary())

    # -- results

    def summary(self) -> dict[str, Any]:
        config = self.config
        stats = self.stats
        end_perf = getattr(self, "_ended_perf", time.perf_counter())
        elapsed = end_perf - self._started_perf
        start = self._steady_start_counts or {"packets_acked": 0, "records_acked": 0, "perf": 0}
        end = self._steady_end_counts or self._counts()
        window = (end["perf"] - (start["perf"] or int(self._started_perf * 1e6))) / 1e6
        packets = end["packets_acked"] - start["packets_acked"]
        records = end["records_acked"] - start["records_acked"]
        out: dict[str, Any] = {
            "mode": "udp" if config.udp else "tcp",
            "host": config.host,
            "port": config.udp_port if config.udp else config.port,
            "devices": len(self.devices),
            "codec": config.codec,
            "records_per_packet": config.records,
            "ios_per_record": config.ios,
            "frame_bytes": self.frame_sizes,
            "rate_per_device": config.rate,
            "ramp_up_s": config.ramp_up,
            "duration_s": config.duration,
            "packets_per_device": config.packets,
            "processes": 1,
            "elapsed_s": round(elapsed, 3),
            "window_s": round(window, 3),
            "window_packets_acked": packets,
            "window_records_acked": records,
            "packets_per_s": packets / window if window > 0 else 0.0,
            "records_per_s": records / window if window > 0 else 0.0,
            **stats.counters(),
            "connected_at_end": self.handshaken,
            "errors": dict(sorted(stats.errors.items())),
            "errors_total": sum(stats.errors.values()),
            "incomplete": self.incomplete,
            "ack_latency_ms": stats.latency.summary_ms(),
            "steady_ack_latency_ms": stats.steady_latency.summary_ms(),
            "histogram": stats.latency.to_json(),
            "steady_histogram": stats.steady_latency.to_json(),
        }
        return out


_SUMMED = (*Stats.COUNTERS, "devices", "window_packets_acked", "window_records_acked")


def merge_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary from those of several simulator processes run side by side."""
    if not parts:
        raise ValueError("nothing to merge")
    out = dict(parts[0])
    for key in (*_SUMMED, "connected_at_end", "errors_total"):
        out[key] = sum(int(p.get(key, 0)) for p in parts)
    for key in ("packets_per_s", "records_per_s"):
        out[key] = sum(float(p.get(key, 0.0)) for p in parts)
    out["elapsed_s"] = max(float(p["elapsed_s"]) for p in parts)
    out["window_s"] = max(float(p["window_s"]) for p in parts)
    out["incomplete"] = any(p.get("incomplete") for p in parts)
    out["processes"] = sum(int(p.get("processes", 1)) for p in parts)
    out["frame_bytes"] = sorted({s for p in parts for s in p.get("frame_bytes", [])})
    errors: dict[str, int] = {}
    for p in parts:
        for name, count in p.get("errors", {}).items():
            errors[name] = errors.get(name, 0) + int(count)
    out["errors"] = dict(sorted(errors.items()))
    for hist_key, summary_key in (
        ("histogram", "ack_latency_ms"),
        ("steady_histogram", "steady_ack_latency_ms"),
    ):
        merged = LatencyHistogram()
        for p in parts:
            merged.merge(LatencyHistogram.from_json(p.get(hist_key, {})))
        out[hist_key] = merged.to_json()
        out[summary_key] = merged.summary_ms()
    return out


# --------------------------------------------------------------------------- replay

_HEX_RUN = re.compile(r"^(?:0x)?[0-9a-fA-F]+$")
_SEPARATORS = re.compile(r"[\s:,]+")


@attrs.frozen
class ReplayItem:
    """One line of a replay file: the bytes to send and what the server should answer.

    ``expects``: ``("handshake",)`` one byte; ``("ack", n)`` a 4-byte ACK of n;
    ``("udp_ack", avl_packet_id, n)``; ``("any",)`` whatever comes (or a close).
    """

    line: int
    data: bytes
    what: str
    expects: tuple[tuple[Any, ...], ...]


def _line_bytes(line: str) -> tuple[bytes | None, str]:
    """(bytes, "") for a hex line; (None, reason) for a line to skip; raises ValueError."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None, "blank"
    tokens = [t for t in _SEPARATORS.split(text) if t]
    if all(_HEX_RUN.match(t) for t in tokens):
        digits = "".join(t[2:] if t[:2].lower() == "0x" else t for t in tokens)
    else:
        # Log line: text (time, level, peer ...) then the hex as the last word.
        head, _, last = text.rpartition(" ")
        if not _HEX_RUN.match(last):
            raise ValueError("no hex frame at the end of the line")
        if ">" in head and "<" not in head:
            return None, "server output"  # Traccar style: "teltonika > peer" = sent by server
        digits = last[2:] if last[:2].lower() == "0x" else last
    if len(digits) % 2:
        raise ValueError(f"odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits), ""


def _describe_frames(data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    """Walk TCP frames in ``data``: a description and the answers the server owes."""
    parts: list[str] = []
    expects: list[tuple[Any, ...]] = []
    pos = 0
    size = len(data)
    while pos < size:
        if data[pos] == 0xFF:
            parts.append("keep-alive")
            pos += 1
            continue
        if size - pos < 12 or data[pos : pos + 4] != _ZERO4:
            parts.append(f"{size - pos} bytes that are not a frame")
            expects.append(("any",))
            break
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        end = pos + 12 + length
        if length < 3 or end > size:
            parts.append(f"truncated frame (declares {length} data bytes)")
            expects.append(("any",))
            break
        body = data[pos + 8 : end - 4]
        codec_id = body[0]
        name = CODEC_IDS.get(codec_id, f"0x{codec_id:02x}")
        crc_ok = int.from_bytes(data[end - 4 : end], "big") == crc16_ibm(body)
        if not crc_ok:
            parts.append(f"Codec {name} frame with a bad CRC")
            expects.append(("any",))
        elif codec_id in _AVL_CODEC_IDS:
            parts.append(f"Codec {name}, {body[1]} records")
            expects.append(("ack", body[1]))
        elif codec_id in _COMMAND_CODEC_IDS:
            parts.append(f"Codec {name} message")
        else:
            parts.append(f"unknown codec {name}")
            expects.append(("any",))
        pos = end
    return ", ".join(parts), expects


def parse_replay(text: str, *, udp: bool = False) -> list[ReplayItem]:
    """Parse a replay file: one hex input per line (see ``simulate --help``).

    TCP: an IMEI handshake (``000F`` + 15 digits, optionally followed by frames), or
    one or more frames, or anything else (sent as is). UDP: one datagram per line.
    Raises ValueError naming the line for a line that holds no hex.
    """
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            data, _skip = _line_bytes(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if data is None:
            continue
        if udp:
            try:
                pkt = decode_udp_datagram(data)
                what = f"UDP Codec {pkt.packet.codec}, {len(pkt.packet.records)} records"
                expects: list[tuple[Any, ...]] = [
                    ("udp_ack", pkt.avl_packet_id, len(pkt.packet.records))
                ]
            except CodecError as exc:
                what = f"undecodable datagram ({exc})"
                expects = [("any",)]
            items.append(ReplayItem(number, data, what, tuple(expects)))
            continue
        if data[:2] == b"\x00\x0f" and len(data) >= 17 and data[2:17].isdigit():
            rest_what, rest = _describe_frames(data[17:]) if len(data) > 17 else ("", [])
            what = f"IMEI handshake {data[2:17].decode()}" + (f", {rest_what}" if rest else "")
            items.append(ReplayItem(number, data, what, (("handshake",), *rest)))
            continue
        what, expects = _describe_frames(data)
        items.append(ReplayItem(number, data, what, tuple(expects)))
    return items


class _ReplayProtocol(protocol.Protocol):
    transport: Any

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.close_reason = ""
        self._waiter: defer.Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.close_reason = reason.getErrorMessage()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def changed(self, timeout: float, clock: Any) -> defer.Deferred[None]:
        """Fires when bytes arrive, the connection closes or ``timeout`` passes."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiter = waiter
        call = clock.callLater(timeout, self._wake)
        waiter.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return waiter


class _UdpReplayProtocol(protocol.DatagramProtocol):
    transport: Any

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self._waiter: defer.Deferred[None] | None = None
        self.closed = False
        self.close_reason = ""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.datagrams.append(datagram)
        self._wake()

    def connectionRefused(self) -> None:
        self.datagrams.append(b"")  # ICMP port unreachable
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def changed(self, timeout: float, clock: Any) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiter = waiter
        call = clock.callLater(timeout, self._wake)
        waiter.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return waiter


async def replay(
    items: Iterable[ReplayItem],
    *,
    host: str,
    port: int,
    imei: str,
    udp: bool = False,
    ack_timeout: float = 10.0,
    answer_commands: bool = False,
    interval: float = 0.0,
    reactor: Any = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Play ``items`` as one device; return ``{"ok", "results", ...}``.

    TCP: connect; send the handshake for ``imei`` unless the first item is one; then
    each item in turn, waiting for what the server owes (``ReplayItem.expects``). Codec
    12/14 commands the server sends meanwhile are reported (and answered with
    ``answer_commands``). Stops at the first close by the server. ``report`` gets each
    result as it happens.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    items = list(items)
    results: list[dict[str, Any]] = []

    def emit(result: dict[str, Any]) -> None:
        results.append(result)
        if report is not None:
            report(result)

    if udp:
        return await _replay_udp(items, host, port, ack_timeout, interval, reactor, emit, results)

    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=ack_timeout)
    factory = protocol.Factory.forProtocol(_ReplayProtocol)
    connected: Any = await endpoint.connect(factory)
    proto: _ReplayProtocol = connected
    if not items or "handshake" not in [e[0] for e in items[0].expects]:
        handshake = ReplayItem(0, encode_imei(imei), f"IMEI handshake {imei}", (("handshake",),))
        items.insert(0, handshake)
    commands: list[str] = []

    def take_commands() -> None:
        # Server -> device command frames at the head of the buffer.
        buf = proto.buf
        while len(buf) >= 12 and buf[:4] == _ZERO4 and buf[8] in _COMMAND_CODEC_IDS:
            size = 12 + int.from_bytes(buf[4:8], "big")
            if len(buf) < size:
                return
            frame = bytes(buf[:size])
            del buf[:size]
            try:
                message = decode_command_frame(frame)
            except CodecError as exc:
                emit({"line": None, "event": "server_frame", "got": f"bad command frame: {exc}"})
                continue
            commands.append(message.text)
            event: dict[str, Any] = {
                "line": None,
                "event": "command",
                "got": f"Codec {message.codec} command {message.text!r}",
            }
            if answer_commands:
                reply = answer_command(message, imei, default_answer)
                if reply is not None and proto.transport is not None:
                    proto.transport.write(reply)
                    event["answered"] = True
            emit(event)

    async def read(n: int, deadline: float) -> bytes | None:
        ambiguous_since: float | None = None
        while True:
            take_commands()
            buf = proto.buf
            # 00000000 could be a zero ACK or the start of a command frame: look further.
            ambiguous = n == 4 and buf[:4] == _ZERO4 and len(buf) < 9
            now = reactor.seconds()
            if ambiguous:
                ambiguous_since = now if ambiguous_since is None else ambiguous_since
                if now - ambiguous_since >= 0.25 or proto.closed:
                    ambiguous = False
            if len(buf) >= n and not ambiguous:
                chunk = bytes(buf[:n])
                del buf[:n]
                return chunk
            if proto.closed or now >= deadline:
                return None
            wait = deadline - now if ambiguous_since is None else 0.05
            await proto.changed(wait, reactor)

    closed = False
    for position, item in enumerate(items):
        if closed or proto.closed:
            emit({"line": item.line, "what": item.what, "sent": False, "ok": False,
                  "got": "not sent: connection closed"})  # fmt: skip
            closed = True
            continue
        if position and interval > 0:
            await proto.changed(interval, reactor)
        started = time.perf_counter()
        assert proto.transport is not None
        proto.transport.write(item.data)
        outcomes: list[str] = []
        ok = True
        for expect in item.expects:
            deadline = reactor.seconds() + ack_timeout
            kind = expect[0]
            if kind == "handshake":
                got = await read(1, deadline)
                if got is None:
                    outcomes.append("no handshake reply" + _closed_note(proto))
                    ok = False
                elif got == b"\x01":
                    outcomes.append("accepted (01)")
                else:
                    outcomes.append(f"rejected ({got.hex()})")
                    ok = False
            elif kind == "ack":
                got = await read(4, deadline)
                if got is None:
                    outcomes.append("no ACK" + _closed_note(proto))
                    ok = False
                else:
                    count = int.from_bytes(got, "big")
                    outcomes.append(f"ACK {count}")
                    if count != expect[1]:
                        outcomes[-1] += f" (expected {expect[1]})"
                        ok = False
            else:  # "any": whatever the server does
                while not proto.buf and not proto.closed and reactor.seconds() < deadline:
                    await proto.changed(deadline - reactor.seconds(), reactor)
                take_commands()
                if proto.buf:
                    outcomes.append(f"server sent {bytes(proto.buf).hex()}")
                    proto.buf.clear()
                elif proto.closed:
                    outcomes.append("server closed the connection")
                else:
                    outcomes.append(f"no answer in {ack_timeout:g} s")
        if not item.expects:
            outcomes.append("nothing expected")
        elapsed_ms = (time.perf_counter() - started) * 1000
        emit({"line": item.line, "what": item.what, "sent": True, "ok": ok,
              "got": "; ".join(outcomes), "ms": round(elapsed_ms, 3)})  # fmt: skip
        if proto.closed:
            closed = True
    take_commands()
    closed_by_server = proto.closed
    if not proto.closed and proto.transport is not None:
        proto.transport.loseConnection()
    frames = [r for r in results if r.get("line") is not None]
    return {
        "mode": "replay",
        "imei": imei,
        "items": len(frames),
        "ok": all(r["ok"] for r in frames),
        "closed_by_server": closed_by_server,
        "close_reason": proto.close_reason if closed_by_server else "",
        "commands": commands,
        "results": results,
    }


def _closed_note(proto: Any) -> str:
    return " (server closed the connection)" if proto.closed else ""


async def _replay_udp(
    items: list[ReplayItem],
    host: str,
    port: int,
    ack_timeout: float,
    interval: float,
    reactor: Any,
    emit: Callable[[dict[str, Any]], None],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    proto = _UdpReplayProtocol()
    listening = reactor.listenUDP(0, proto)
    proto.transport.connect(socket.gethostbyname(host), port)
    try:
        for position, item in enumerate(items):
            if position and interval > 0:
                await proto.changed(interval, reactor)
            proto.datagrams.clear()
            started = time.perf_counter()
            proto.transport.write(item.data)
            deadline = reactor.seconds() + ack_timeout
            while not proto.datagrams and reactor.seconds() < deadline:
                await proto.changed(deadline - reactor.seconds(), reactor)
            ok = True
            expect = item.expects[0]
            if not proto.datagrams:
                got = f"no answer in {ack_timeout:g} s"
                ok = expect[0] == "any"
            elif proto.datagrams[0] == b"":
                got = "port unreachable"
                ok = False
            else:
                answer = proto.datagrams[0]
                got = f"server sent {answer.hex()}"
                if expect[0] == "udp_ack":
                    if len(answer) == 7:
                        _l, _pid, _one, avl_id, count = _UDP_ACK.unpack(answer)
                        got = f"UDP ACK {count} for AVL packet {avl_id}"
                        ok = avl_id == expect[1] and count == expect[2]
                    else:
                        ok = False
            emit({"line": item.line, "what": item.what, "sent": True, "ok": ok, "got": got,
                  "ms": round((time.perf_counter() - started) * 1000, 3)})  # fmt: skip
    finally:
        listening.stopListening()
    return {
        "mode": "replay-udp",
        "items": len(results),
        "ok": all(r["ok"] for r in results),
        "closed_by_server": False,
        "close_reason": "",
        "commands": [],
        "results": results,
    }
