"""Simulated devices over TCP and UDP (state, timeouts, resend after reconnect) and their
answers to Codec 12/14 commands."""

from __future__ import annotations

import contextlib
import enum
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol, tcp
from twisted.python.failure import Failure

from teltonika_ingest.codec import (
    CODEC_12,
    CODEC_14,
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    CodecError,
    CommandMessage,
    decode_command_frame,
    encode_command_message,
    encode_imei,
)
from teltonika_ingest.sim.traffic import (
    COMMAND_CODEC_IDS,
    UDP_ACK,
    ZERO4,
    FrameTemplate,
    UdpTemplate,
)
from teltonika_ingest.writenow import write_now

if TYPE_CHECKING:
    from teltonika_ingest.sim.simulation import Simulation

# --------------------------------------------------------------------------- devices


class DeviceState(enum.IntEnum):
    WAITING = 0  # not connected, nothing scheduled (before start, or done)
    CONNECTING = 1
    HANDSHAKE = 2  # IMEI sent, waiting for 01/00
    READY = 3  # connected, no packet in flight
    AWAITING_ACK = 4


_WAITING = DeviceState.WAITING
_CONNECTING = DeviceState.CONNECTING
HANDSHAKE_SENT = DeviceState.HANDSHAKE
_READY = DeviceState.READY
AWAITING_ACK = DeviceState.AWAITING_ACK


class BaseDevice:
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


class _DeviceProtocol(protocol.Protocol):
    device: TcpDevice
    transport: Any  # ITCPTransport once connected

    def connectionMade(self) -> None:
        self.device.connected(self)

    def dataReceived(self, data: bytes) -> None:
        device = self.device
        # Fast path: a whole ACK, alone, while one is expected.
        if device.state is AWAITING_ACK and len(data) == 4 and not device.rbuf and data != ZERO4:
            device._acked(int.from_bytes(data, "big"))
            return
        device.received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.device.lost(self, reason)


class TcpDevice(BaseDevice, protocol.ClientFactory):
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
        bind = sim.bind_address(self.index)
        if bind is None or not hasattr(sim.reactor, "_selectables"):  # not a real reactor
            self.connector = sim.reactor.connectTCP(
                sim.config.host,
                sim.config.port,
                self,
                timeout=sim.config.connect_timeout,
                bindAddress=bind,
            )
            return
        connector = _SourceAddressConnector(
            sim.config.host, sim.config.port, self, sim.config.connect_timeout, bind, sim.reactor
        )
        connector.connect()
        self.connector = connector

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
        self.state = HANDSHAKE_SENT
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
        elif state is AWAITING_ACK:
            sim.stats.error("closed_awaiting_ack")
        elif state is HANDSHAKE_SENT:
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
        self.state = AWAITING_ACK
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
            if state is HANDSHAKE_SENT:
                reply = buf[0]
                del buf[0]
                self._handshake_reply(reply)
                continue
            if buf[:4] == ZERO4:
                # A server -> device command frame, or (only when an ACK is due) a zero ACK.
                if len(buf) < 9:
                    if state is AWAITING_ACK and len(buf) >= 4:
                        # Ambiguous until byte 9 arrives; a real zero ACK is answered by
                        # the ACK timeout (a zero count is never the count we sent).
                        pass
                    return
                if buf[8] in COMMAND_CODEC_IDS:
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
                if state is not AWAITING_ACK:
                    self.sim.stats.error("unexpected_data")
                    buf.clear()
                    return
            if state is AWAITING_ACK:
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
        if state is AWAITING_ACK:
            if now - self.sent_at > timeout:
                self.sim.stats.error("ack_timeout")
                self._drop()
        elif state is HANDSHAKE_SENT and now - self.handshake_sent_at > timeout:
            self.sim.stats.error("handshake_timeout")
            self._drop()


class UdpDevice(BaseDevice, protocol.DatagramProtocol):
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
        bind = sim.bind_address(self.index)
        self.port = sim.reactor.listenUDP(0, self, interface=bind[0] if bind else "")
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
        self.state = AWAITING_ACK
        self.sent_at = time.perf_counter()
        self.transport.write(self.pending)
        stats.packets_sent += 1
        stats.records_sent += self.pending_count

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) != 7 or self.state is not AWAITING_ACK or self.pending is None:
            self.sim.stats.error("unexpected_datagram")
            return
        _length, _packet_id, _one, avl_id, count = UDP_ACK.unpack(datagram)
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
        if self.state is AWAITING_ACK and now - self.sent_at > timeout:
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


#: Linux: bind() to an address without taking a port; connect() then picks one unique for the
#: whole (source, destination) pair, as an unbound socket does, instead of one free on the
#: source address for every destination. Without it, bind(("127.0.1.x", 0)) runs out of ports
#: (or slows down the search for one) long before 28,000 connections per address when the
#: previous run's TIME_WAIT sockets still hold ports on that address.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class _SourceAddressClient(tcp.Client):
    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()
        with contextlib.suppress(OSError):  # not Linux: the plain bind
            skt.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        return skt


class _SourceAddressConnector(tcp.Connector):
    """``reactor.connectTCP(..., bindAddress=...)`` with ``IP_BIND_ADDRESS_NO_PORT``."""

    def _makeTransport(self) -> tcp.Client:
        return _SourceAddressClient(self.host, self.port, self.bindAddress, self, self.reactor)
